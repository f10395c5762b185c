// The sidebar as a drawer on narrow screens (CSS decides the look: see `.drawer-open` in app.css).
// The toggle opens and closes it (aria-expanded says which); Escape, a tap outside it and choosing something in it
// (the page calls close()) close it. While it is open the rest of the page is inert and focus is inside it;
// closing gives focus back to the toggle when it was inside. On wide screens the sidebar is always shown and the
// toggle is not: a drawer left open when the screen widens is closed.

const FOCUSABLE = "button:not([disabled]), [href], input:not([disabled]), select:not([disabled]), " +
  "textarea:not([disabled]), summary, [tabindex]:not([tabindex='-1'])";

export class Drawer {
  /**
   * `root` gets the class `drawer-open`; `inert` are the elements that must not be reached while it is open;
   * `narrow` is the media query under which the sidebar is a drawer (the one app.css uses).
   */
  constructor({ toggle, panel, backdrop, root, inert = [], narrow = "(max-width: 720px)" }) {
    Object.assign(this, { toggle, panel, backdrop, root, inert });
    this.narrow = window.matchMedia(narrow);
    toggle.addEventListener("click", () => (this.isOpen ? this.close() : this.open()));
    // Capture: before the page's own Escape (which stops an answer), so one Escape does one thing.
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && this.isOpen) {
        event.preventDefault();
        this.close({ restoreFocus: true });
      }
    }, true);
    document.addEventListener("click", (event) => {
      const path = event.composedPath(); // as dispatched: a button the click removed from the page is still inside
      if (this.isOpen && !path.includes(panel) && !path.includes(toggle)) this.close();
    });
    this.narrow.addEventListener("change", () => { if (!this.narrow.matches) this.close(); });
  }

  get isOpen() {
    return this.toggle.getAttribute("aria-expanded") === "true";
  }

  open() {
    if (!this.narrow.matches) return;
    this.toggle.setAttribute("aria-expanded", "true");
    this.root.classList.add("drawer-open");
    this.backdrop.hidden = false;
    for (const el of this.inert) el.inert = true;
    this.panel.querySelector(FOCUSABLE)?.focus();
  }

  /** Close it; true when it was open. Focus goes back to the toggle if it was inside (or `restoreFocus`). */
  close({ restoreFocus = false } = {}) {
    if (!this.isOpen) return false;
    const focusInside = this.panel.contains(document.activeElement);
    this.toggle.setAttribute("aria-expanded", "false");
    this.root.classList.remove("drawer-open");
    this.backdrop.hidden = true;
    for (const el of this.inert) el.inert = false;
    if (restoreFocus || focusInside) this.toggle.focus();
    return true;
  }
}

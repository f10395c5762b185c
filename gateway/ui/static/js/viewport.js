// The room the page really has on a phone, for a layout that must end above an on-screen keyboard.

/**
 * Keep `--viewport-height` on `root` at the visual viewport's height, so a layout sized with it ends above an
 * on-screen keyboard where the browser only shrinks the visual viewport (iOS Safari). Left unset while the page is
 * pinch-zoomed, where the visual viewport is a magnified part of the page, not the room there is.
 */
export function trackViewportHeight(root) {
  const viewport = window.visualViewport;
  if (!viewport) return;
  const update = () => {
    if (viewport.scale > 1.01) root.style.removeProperty("--viewport-height");
    else root.style.setProperty("--viewport-height", `${Math.round(viewport.height)}px`);
  };
  viewport.addEventListener("resize", update);
  update();
}

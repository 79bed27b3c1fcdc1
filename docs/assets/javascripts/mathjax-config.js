// MathJax 3 (vendored, SVG output: glyphs are paths, so no web fonts are fetched) for the
// pymdownx.arithmatex "generic" output. Follows the Material for MkDocs recipe, minus the CDN.
window.MathJax = {
  tex: {
    // \( \) and \[ \] come from arithmatex; $ and $$ from the notebooks' markdown cells.
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|jp-MarkdownOutput",
    enableMenu: false, // the menu's accessibility extensions would be fetched from a CDN
  },
  svg: { fontCache: "global" },
};

// Material replaces page content without a reload (instant navigation): typeset again each time.
document$.subscribe(() => {
  if (window.MathJax.typesetPromise) {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  }
});

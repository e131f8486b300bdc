// Render the maths that pymdownx.arithmatex (generic mode) wraps in .arithmatex elements
// as \( \) and \[ \], on first load and after each instant-navigation page change.
document$.subscribe(({ body }) => {
  for (const el of body.querySelectorAll(".arithmatex")) {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
});

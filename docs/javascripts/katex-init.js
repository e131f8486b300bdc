// Render the maths that pymdownx.arithmatex (generic mode) wraps in .arithmatex elements
// as \( \) and \[ \], on first load and after each instant-navigation page change.
const KATEX_OPTIONS = {
  delimiters: [
    { left: "\\(", right: "\\)", display: false },
    { left: "\\[", right: "\\]", display: true },
  ],
  throwOnError: false,
};

document$.subscribe(({ body }) => {
  for (const el of body.querySelectorAll(".arithmatex")) {
    renderMathInElement(el, KATEX_OPTIONS);
  }

  // Search previews carry the raw \( \) source of formulas: typeset them as results appear.
  const results = document.querySelector(".md-search-result__list");
  if (results && !results.dataset.katexObserved) {
    results.dataset.katexObserved = "true";
    const observer = new MutationObserver(() => {
      observer.disconnect(); // typesetting mutates the list: do not react to our own changes
      renderMathInElement(results, KATEX_OPTIONS);
      observer.observe(results, { childList: true, subtree: true });
    });
    observer.observe(results, { childList: true, subtree: true });
  }
});

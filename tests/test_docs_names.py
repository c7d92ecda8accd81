"""Every repository path, heading anchor and ``edpo_plugin`` name that README.md and docs/*.md name exists, so that a
moved file, a renamed heading or a renamed symbol fails here rather than in a newcomer's hands.

What counts as named, in each document:

- paths: a Markdown link's target (relative to the document; a ``#anchor`` must be a heading of the target); anywhere
  in the text, a path under a top-level folder of the repository (``benchmarks/results/roofline.json``; with
  ``::name``, ``name`` must be defined in that file) or under a package folder (``ops/plan.py``); a bare file name
  in backticks or in a text block (``prepare_hh.py``): some tracked file has that name;
- symbols: dotted ``edpo_plugin.…`` names (imported and resolved); in backticks, CamelCase and UPPER_CASE names
  (``HeadPlan``, ``HeadPlan.describe``) and calls of such or of snake_case functions (``linear_logprobs(...)``):
  defined in the package, or one of :data:`EXTERNAL` (each with the library it comes from); ``edpo_*`` names
  (options, attention names): written in the package's source.

And ``docs/design.md``'s layout block lists every module and entry point of the folders it describes, and only
those."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PACKAGE = REPO / "edpo_plugin"
PACKAGE_FOLDERS = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
FILE_EXTENSIONS = ("py", "sh", "md", "yaml", "png")  # bare names of these are checked; .json names are often outputs

# Names the docs use that belong to other libraries (or to Python), with where each comes from.
EXTERNAL = {
    "add_fused_lm_head": "trl 1.16 (trl/kernels/chunked_logprob.py)",
    "AttentionInterface": "transformers",
    "AXOLOTL_LOG_LEVEL": "axolotl (environment variable)",
    "base_model_prefix": "transformers (PreTrainedModel)",
    "bos_token": "transformers (tokenizers)",
    "chat_template": "axolotl (dataset type chat_template.*)",
    "ChunkedLogProbFunction": "trl 1.16 (trl/kernels/chunked_logprob.py)",
    "dataset_prepared_path": "axolotl (YAML field)",
    "dim_model_base": "transformers (MiniCPM config)",
    "disable_adapter": "peft (PeftModel.disable_adapter)",
    "DPOTrainer": "trl",
    "embed_tokens": "transformers (decoder modules)",
    "Gemma3ForCausalLM": "transformers",
    "gradient_accumulation_steps": "transformers (TrainingArguments)",
    "KeyError": "Python",
    "LigerFusedLinearDPOLoss": "liger-kernel",
    "Llama4ForCausalLM": "transformers",
    "load_cfg": "axolotl (axolotl.cli.config.load_cfg)",
    "log_softmax": "torch",
    "MllamaForCausalLM": "transformers",
    "my_llama": "the docs' example of a custom model_type",
    "not_drawn": "the device tool's status (benchmarks.md's GPU section)",
    "PeftModel": "peft",
    "sequence_len": "axolotl (YAML field)",
    "Shard": "torch.distributed.tensor",
    "to_dict": "transformers (TrainingArguments.to_dict)",
    "train_runtime": "transformers (Trainer metrics)",
    "TrainableTokensConfig": "peft",
    "TypeError": "Python",
    "ValueError": "Python",
    "vocab_parallel_cross_entropy": "megatron-core (the peer the vocab-parallel head is tested against)",
}
# Misspellings the docs show on purpose, to document the refusal a user gets for them.
MISSPELT = {"edpo_epsion", "epdo_epsilon"}


def _text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


@cache
def _tracked() -> frozenset[str]:
    """Repository-relative paths of the tracked files and of the folders that hold them."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = set(listed.splitlines())
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: what is on disk, less the usual clutter
        skip = {"__pycache__", "outputs"}
        files = {
            str(p.relative_to(REPO))
            for p in REPO.rglob("*")
            if p.is_file() and not any(part.startswith(".") or part in skip for part in p.relative_to(REPO).parts)
        }
        files |= {str(p.relative_to(REPO)) for p in (REPO / ".ci").glob("*")}
    folders = {str(parent) for f in files for parent in Path(f).parents}
    return frozenset(files | (folders - {"."}))


def _exists(path: str) -> bool:
    return path.rstrip("/") in _tracked()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces and hyphens kept),
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    body = re.sub(r"```.*?```", "", _text(doc), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", body, re.M)}


def _roots() -> list[str]:
    return sorted({p.split("/")[0] for p in _tracked() if "/" in p}, key=len, reverse=True)


def _named_paths(doc: Path) -> list[tuple[str, str]]:
    """(what the document wrote, the repository path it resolves to, or "" when nothing can be resolved)."""
    text = _text(doc)
    named: list[tuple[str, str]] = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path = target.split("#")[0] or doc.name
        resolved = (doc.parent / path).resolve()
        rel = str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else ""
        named.append((target, rel))
    roots = "|".join(re.escape(r) for r in _roots())
    for match in re.finditer(rf"(?<![\w./$~-])((?:{roots})/[\w./-]*)(::\w+)?", text):
        named.append((match.group(0), match.group(1).rstrip(".")))
    folders = "|".join(PACKAGE_FOLDERS)
    for match in re.finditer(rf"(?<![\w./$~-])((?:{folders})/\w+\.py)\b", text):
        named.append((match.group(0), f"{PACKAGE.name}/{match.group(1)}"))
    blocks = re.findall(r"```\n(.*?)```", text, re.S)  # text blocks (layouts, commands), not yaml / python / bash
    snippets = re.findall(r"`([^`\n]+)`", text) + blocks
    ext = "|".join(FILE_EXTENSIONS)
    names = {n for s in snippets for n in re.findall(rf"(?<![\w./$…-])([\w][\w.-]*\.(?:{ext}))\b(?!/)", s)}
    by_name: dict[str, str] = {}
    for path in _tracked():
        by_name.setdefault(Path(path).name, path)
    named += [(name, by_name.get(name, "")) for name in sorted(names) if "/" not in name]
    return named


def test_the_docs_name_enough_to_check():
    """The patterns still find what the docs name (a pattern that matched nothing would pass everything)."""
    paths = [p for doc in DOCS for _, p in _named_paths(doc)]
    symbols = [s for doc in DOCS for _, s in _named_symbols(doc)]
    assert len(paths) > 200 and len(symbols) > 80, (len(paths), len(symbols))
    assert {"examples/prepare_hh.py", "benchmarks/results/roofline.json", "edpo_plugin/ops/plan.py"} <= set(paths)
    assert {"edpo_plugin.ops.linear_logprobs", "HeadPlan", "edpo_head_workspace_mb"} <= set(symbols)
    assert len(_layout()) >= 10


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_no_template_placeholder_is_left(doc):
    """A line that is only ``{name}`` is a table or text a script was meant to paste in."""
    left = [line for line in doc.read_text(encoding="utf-8").splitlines() if re.fullmatch(r"\s*\{\w+\}\s*", line)]
    assert not left, left


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_path_a_doc_names_exists(doc):
    missing = []
    for written, path in _named_paths(doc):
        if not path or not _exists(path):
            missing.append(written)
            continue
        if "#" in written and path.endswith(".md"):
            anchor = written.split("#", 1)[1]
            if anchor not in _anchors(REPO / path):
                missing.append(f"{written} (no such heading)")
        if "::" in written:
            name = written.split("::")[1]
            if not re.search(rf"^\s*(?:async )?(?:def|class) {name}\b", (REPO / path).read_text(), re.M):
                missing.append(f"{written} (not defined there)")
    assert not missing, f"{doc.name} names what does not exist (or is not git-added yet): {missing}"


@cache
def _defined_names() -> frozenset[str]:
    """Every name the repository's Python defines (the package, its tests and scripts): functions, classes, module
    constants, class fields and methods (not what it imports from elsewhere)."""
    names: set[str] = set()
    for source in (REPO / f for f in _tracked() if f.endswith(".py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return frozenset(names)


def _resolves(dotted: str) -> bool:
    """``edpo_plugin.a.b.C.d``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _looks_like_a_symbol(name: str) -> bool:
    camel = re.fullmatch(r"[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*", name) and re.search(r"[a-z].*[A-Z]|[A-Z]{2}", name)
    upper = re.fullmatch(r"[A-Z][A-Z0-9]*_[A-Z0-9_]+", name)
    return bool(camel or upper)


def _snake(name: str) -> bool:
    """A snake_case name (``pack_rows``), not notation (``s_i``, ``z_ref``)."""
    return re.fullmatch(r"[a-z][a-z0-9]+(?:_[a-z0-9]+)+", name) is not None


def _named_symbols(doc: Path) -> list[tuple[str, str]]:
    """(what the document wrote, the symbol to look up): ``edpo_plugin.…`` names whole, others by their first name
    (``Class.attr`` → ``Class``) or, for a call, by the function called."""
    text = _text(doc)
    named = [(m, m) for m in re.findall(r"(?<![\w/.])edpo_plugin(?:\.\w+)+", text)]
    for snippet in re.findall(r"`([^`\n]+)`", text):
        if re.search(rf"\.(?:{'|'.join(FILE_EXTENSIONS)}|json|jsonl|gz)$", snippet):
            continue  # a file name: the paths' test
        call = re.match(r"((?:\w+\.)*)(\w+)\(", snippet) if snippet.endswith(")") else None
        if call and not call.group(1).startswith("edpo_plugin."):
            if _snake(call.group(2)) or _looks_like_a_symbol(call.group(2)):
                named.append((snippet, call.group(2)))
            continue
        plain = re.fullmatch(r"(\w+)(?:\.\w+)*", snippet)
        if (
            plain
            and plain.group(1) != "edpo_plugin"
            and (_looks_like_a_symbol(plain.group(1)) or _snake(plain.group(1)))
        ):
            named.append((snippet, plain.group(1)))
        named += [(snippet, option) for option in re.findall(r"(?<![\w/.-])edpo_(?!plugin\b)[a-z_]+\b", snippet)]
    return named


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_edpo_plugin_name_a_doc_names_exists(doc):
    source = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py"))
    missing = []
    for written, name in _named_symbols(doc):
        if name.startswith("edpo_plugin."):
            ok = _resolves(name)
        elif name.startswith("edpo_"):
            ok = re.search(rf"\b{name}\b", source) is not None
        else:  # a snake_case name may also be a model config key or argument the package reads
            ok = name in _defined_names() or name in EXTERNAL or _snake(name) and re.search(rf"\b{name}\b", source)
        ok = ok or name in MISSPELT
        if not ok:
            missing.append(written)
    assert not missing, (
        f"{doc.name} names what the package does not define (rename it in the doc, or add a name that belongs to "
        f"another library to EXTERNAL): {sorted(set(missing))}"
    )


def _layout() -> dict[str, set[str]]:
    """docs/design.md's layout block: each entry (``edpo_plugin/ops/``, ``edpo_plugin/loss.py``) → the file names
    written on its lines."""
    design = _text(REPO / "docs" / "design.md")
    block = re.search(r"^## Layout\n.*?```\n(.*?)```", design, re.S | re.M).group(1)
    entries: dict[str, set[str]] = {}
    for line in block.splitlines():
        if line and not line[0].isspace():
            entry, _, line = line.partition(" ")
            entries[entry] = set()
        entries[entry] |= set(re.findall(r"(?<![\w/.])(\w+\.(?:py|sh))\b", line))
    return entries


def test_the_layout_lists_every_module_and_entry_point():
    """Each folder the layout describes, among the package's and the entry points' (scripts/, examples/,
    benchmarks/): the modules and scripts in it (``__init__.py`` aside) are the ones the layout names there."""
    entries = _layout()
    for folder in (PACKAGE, REPO / "scripts", REPO / "examples", REPO / "benchmarks"):
        assert any(e.rstrip("/").startswith(str(folder.relative_to(REPO))) for e in entries), folder
    wrong = {}
    for entry, listed in entries.items():
        folder = REPO / entry
        if not entry.endswith("/") or not (entry.startswith(PACKAGE.name) or entry.split("/")[0] in
                                           ("scripts", "examples", "benchmarks")):  # fmt: skip
            continue
        present = {p.name for p in folder.iterdir() if p.suffix in (".py", ".sh") and p.name != "__init__.py"}
        if listed - {"__init__.py"} != present:
            wrong[entry] = {
                "not listed": sorted(present - listed),
                "no such file": sorted(listed - present - {"__init__.py"}),
            }
    assert not wrong, f"docs/design.md's layout block and the files disagree: {wrong}"

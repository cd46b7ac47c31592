"""The documentation site's generated pages (an mkdocs hook, named in mkdocs.yml): one page per catalogue
layer, from the same derivation `ttr explain --latex` prints, and the catalogue's table.

    pip install 'ttr[docs]' && mkdocs build --strict      # or mkdocs serve
"""

from __future__ import annotations

from pathlib import Path

# absolute imports: mkdocs loads this file by its path
from ttr_codegen.pipeline import compile_spec, explanation, generated_ops

ROOT = Path(__file__).resolve().parents[1]
OP_DESCRIPTIONS = {  # generated file -> what it holds, for the pages
    "chunk.py": "`chunk_<name>`: the chunked parallel form (PyTorch; Triton on a GPU where kernels exist)",
    "flash.py": "`flash_<name>`: the attention form streamed over key blocks (Triton kernels on a GPU)",
    "chunk_triton.py": "Triton chunked kernels, forward and derived backward",
    "flash_triton.py": "Triton attention kernels, forward and derived backward",
    "fused_recurrent.py": "`fused_recurrent_<name>`: the Triton decoding kernel",
    "context_parallel.py": "`context_parallel_<name>`: the chunked form with its sequences split across the ranks of a "
                           "process group (docs/distributed.md)",
    "naive_backward.py": "`naive_<name>_backward`: the derived adjoint as a reverse token loop",
}


def layer_page(spec_path: Path) -> tuple[str, list[str]]:
    """(the page's markdown, the catalogue row: name, structure, optimiser, inputs, ops) for one spec."""
    compiled = compile_spec(spec_path, ROOT / "generated")
    spec, rule = compiled.spec, compiled.rule
    files = {f.relative_path for f in compiled.files}
    lines = [f"# {spec.name}", "", spec.description, "", "```yaml", spec_path.read_text().rstrip(), "```", ""]
    if rule is not None:  # a nonlinear memory has no closed-form update to render
        lines += ["## Objective", "", f"$$ {rule.objective_latex} $$", "",
                  f"## Derived update ({'per sub-step' if rule.substeps > 1 else 'per token'}) and read-out", ""]
        lines += [line for a in rule.update for line in (f"$$ {a.target}_t = {a.value.latex()} $$", "")]
        lines += [line for a in rule.readout for line in (f"$$ {a.target} = {a.value.latex()} $$", "")]
        lines += ["", f"**Structure:** {rule.structure} — {rule.structure_detail}", ""]
    lines += ["## `ttr explain`", "", "```", *explanation(compiled), "```", ""]
    lines += ["## Generated", "", f"`ttr generate specs/{spec_path.name}` writes `generated/{spec.name}/`:", "",
              f"- `naive_{spec.name}`: the token-by-token reference; `{spec.camel_name}`: the layer module "
              "([its API](../layer_api.md))"]
    lines += [f"- {text.replace('<name>', spec.name)}" for name, text in OP_DESCRIPTIONS.items() if name in files]
    lines += ["", "Speed against fla and SDPA, where measured: [Triton kernels](../triton.md), "
              "[training](../training.md).", ""]
    inputs = ", ".join(f"`{i.name}` [{', '.join(i.shape)}]" for i in spec.inputs) or "—"
    structure = compiled.structure if rule is not None else "nonlinear"
    return "\n".join(lines), [f"[{spec.name}]({spec.name}.md)", structure, spec.optimiser.summary, inputs,
                              " ".join(generated_ops(compiled))]


def catalogue_pages(specs_dir: Path = ROOT / "specs") -> dict[str, str]:
    """{path under docs: markdown} for every spec in the catalogue and the catalogue's index."""
    pages, rows = {}, []
    for path in sorted(specs_dir.glob("*.yaml")):
        page, row = layer_page(path)
        pages[f"layers/{path.stem}.md"] = page
        rows.append(row)
    table = ["| layer | structure | optimiser | inputs | generated ops |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    intro = ["# The catalogue", "", "Every spec in `specs/`, with what `ttr` derives from it.", ""]
    pages["layers/index.md"] = "\n".join(intro + table) + "\n"
    return pages


def on_files(files, config):
    """mkdocs hook: add the catalogue's pages to the site."""
    from mkdocs.structure.files import File

    for path, content in catalogue_pages().items():
        files.append(File.generated(config, path, content=content))
    return files


def on_config(config):
    """mkdocs hook: the catalogue's pages in the navigation, where mkdocs.yml puts `The catalogue`."""
    section = [{"Overview": "layers/index.md"}] + [{path.stem: f"layers/{path.stem}.md"}
                                                    for path in sorted((ROOT / "specs").glob("*.yaml"))]
    config["nav"] = [{"The catalogue": section} if isinstance(entry, dict) and "The catalogue" in entry else entry
                     for entry in config["nav"]]
    return config

"""`llamactl list / show / rm / import / pull`: the model store, managed by name."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from llamactl.cli import _complete
from llamactl.cli._common import (
    cli_command,
    context_note,
    fail,
    human_bytes,
    human_count,
    print_json,
    print_pairs,
    stderr,
)
from llamactl.errors import ModelNotFoundError, UsageError
from llamactl.home import models_home
from llamactl.info import describe_storage
from llamactl.plugins import hookimpl
from llamactl.pull import pull_model
from llamactl.store import (
    hash_work,
    import_model,
    linked_to,
    list_models,
    remove_model,
    show_model,
    store_path,
)

JSON_HELP = "Print JSON for scripts."


def _columns(rows: list[list[str]]) -> None:
    """Aligned plain-text columns (no colour, so pipes and terminals read the same)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


class _Bar:
    """A rich progress bar on stderr (drawn only on a terminal) fed by library callbacks."""

    def __init__(self, description: str) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            disable=not stderr.is_terminal,
            transient=True,
        )
        self.description = description
        self.task: TaskID | None = None

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, total: int, done: int, files: int) -> None:
        self.task = self.progress.add_task(f"{self.description} ({files} files)", total=total, completed=done)

    def advance(self, nbytes: int) -> None:
        if self.task is None:
            self.start(0, 0, 0)
        assert self.task is not None
        self.progress.advance(self.task, nbytes)

    def note(self, message: str) -> None:
        self.progress.console.print(f"llamactl: {message}", markup=False, highlight=False)


def list_command(json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """List the models in the store: name, format, parameters, dtype, size, path."""
    entries = list_models()
    if json_output:
        print_json([e.to_dict() for e in entries])
        return
    if not entries:
        print(
            f"no models in {models_home()} yet (llamactl pull REPO_ID, or llamactl import PATH NAME)", file=sys.stderr
        )
        return
    rows = [["NAME", "FORMAT", "PARAMS", "DTYPE", "SIZE", "PATH"]]
    for e in entries:
        dtype = e.quantization or e.dtype or "?"
        path = f"{e.path} -> {e.linked_to}" if e.linked_to else e.path
        path += " (an installed package's)" if e.source else ""
        rows.append([e.name, e.format or "ERROR", human_count(e.params), dtype, human_bytes(e.size), path])
    _columns(rows)
    for e in entries:
        if e.error:
            print(f"llamactl: warning: {e.name}: {e.error}", file=sys.stderr)


def _print_show(data: dict[str, Any]) -> None:
    info = data["info"]
    lines = [
        ("name", data["name"]),
        ("path", data["path"] + (f" -> {data['linked_to']}" if data["linked_to"] else "")),
        ("format", info["format"]),
        (
            "attention",
            f"{info['attention']}: {info['n_heads']} heads, {info['n_kv_heads']} KV heads, head dim {info['head_dim']}",
        ),
        (
            "shape",
            f"dim {info['dim']}, {info['n_layers']} layers, FFN {info['hidden_dim']}, vocab {info['vocab_size']}",
        ),
        (
            "context",
            f"{info['max_seq_len']} ({context_note(info['trained_context'])}, rope theta {info['rope_theta']:g})",
        ),
        ("parameters", f"{info['parameters']:,} ({human_count(info['parameters'])})"),
        ("dtype", info["dtype"]),
        ("quantization", data["quantization"] or "none"),
        *([("storage", describe_storage(info["storage"]))] if info.get("storage") else []),
        ("size", f"{human_bytes(data['size'])} in {len(data['files'])} file(s)"),
        ("config", ", ".join(f"{k}={v}" for k, v in data["config"].items())),
        ("tokenizer", info["tokenizer"] or "none found"),
        ("chat template", data["chat_template_source"]),
        (
            "weights fp16/int8/nf4",
            " / ".join(human_bytes(info["memory"][k]) for k in ("weights_fp16", "weights_int8", "weights_nf4")),
        ),
        (f"KV cache @ {info['ctx']}", human_bytes(info["memory"]["kv_cache_at_ctx"])),
    ]
    if data["source"]:
        src = data["source"]
        lines.append(("source", f"{src.get('repo_id')}@{src.get('commit')} (pulled {src.get('pulled_at')})"))
    print_pairs(lines)
    print("files:")
    if data["files"]:
        _columns([[f["sha256"], human_bytes(f["size"]), f["path"]] for f in data["files"]])


def show_command(
    model: Annotated[
        str,
        typer.Argument(
            help="A model name in the store, or a checkpoint directory.", autocompletion=_complete.store_names
        ),
    ],
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Everything about a model: config, tokenizer, chat template, files with sizes and sha256."""
    ensure_model(model, offer=False)
    with _Bar("hashing") as bar:
        bar.start(hash_work(model), 0, 0)
        data = show_model(model, progress=bar.advance)
    if json_output:
        print_json(data)
    else:
        _print_show(data)


def rm_command(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="The model's name in the store.", autocompletion=_complete.store_names)
    ],
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask; required when stdin is not a terminal.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Remove a model from the store (a linked import loses only its link)."""
    path = store_path(name)
    linked = linked_to(path)
    if not yes:
        if not sys.stdin.isatty():
            raise fail(f"{name}: not removed: stdin is not a terminal, pass --yes to confirm", 2)
        what = f"the link {path} (its files stay)" if path.is_symlink() else f"{path} and all its files"
        if not typer.confirm(f"Remove {what}?", default=False, err=True):
            raise fail(f"{name}: not removed", 1)
    remove_model(name)
    if json_output:
        print_json({"name": name, "path": str(path), "removed": True, "linked_to": linked})
    else:
        print(f"removed {name}")


ImportMode = Annotated[
    bool, typer.Option("--move", help="Move the source into the store (it is gone from where it was).")
]


def import_command(
    path: Annotated[
        str,
        typer.Argument(
            metavar="PATH", help="A checkpoint directory (Meta, Hugging Face or a plugin format) or a .gguf file."
        ),
    ],
    name: Annotated[str, typer.Argument(metavar="NAME", help="The name to give it in the store.")],
    move: ImportMode = False,
    link: Annotated[bool, typer.Option("--link", help="Symlink the source instead of copying it.")] = False,
    ctx: Annotated[
        int | None,
        typer.Option(
            "--ctx", help="The trained context in tokens, recorded for a Meta checkpoint (params.json has none)."
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Copy a local checkpoint into the store under NAME; the source stays as it was.

    The copy is cheap where the filesystem allows (reflinks, else hard links). A .gguf becomes
    NAME/<file>.gguf. --move moves the source in; --link symlinks it.
    """
    if move and link:
        raise UsageError("--move and --link contradict each other; give one (default: copy)")
    mode = "move" if move else "link" if link else "copy"
    result = import_model(path, name, mode=mode, ctx=ctx)
    if json_output:
        print_json(result.to_dict())
        return
    verb = {"copy": "copied", "move": "moved", "link": "linked"}[mode]
    how = f" ({result.how})" if mode == "copy" else ""
    context = f"; trained context {result.trained_context}" if result.trained_context else ""
    print(f"{verb} {result.source} into the store as {name}{how}{context}: {result.path}")


def pull_command(
    repo_id: Annotated[str, typer.Argument(help="A Hugging Face repository, e.g. meta-llama/Llama-2-7b-chat-hf.")],
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit (default: main).")] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Store name (default from the repo: Llama-2-7b-chat-hf -> 7b-chat).")
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include",
            help="Only files matching this glob (repeatable). Default: all but redundant "
            "weight formats (.bin/.pth ...) when safetensors are present.",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Download a Hugging Face repository into the store (resumable, verified by size and hash).

    Gated repositories (meta-llama/*) use your token from HF_TOKEN or `hf auth login`.
    """
    pull_and_report(repo_id, name, revision, include, json_output)


def pull_and_report(
    repo_id: str,
    name: str | None,
    revision: str | None = None,
    include: list[str] | None = None,
    json_output: bool = False,
    on_stderr: bool = False,
) -> None:
    """Pull with a progress bar on stderr, then say what arrived: on stdout for `pull`, on stderr
    (`on_stderr`) when `chat 7b-chat` pulls on its way to answering on stdout."""
    with _Bar(f"pulling {repo_id}") as bar:
        result = pull_model(repo_id, name=name, revision=revision, include=include, progress=bar)
    if json_output:
        print_json(
            {
                "name": result.name,
                "path": str(result.path),
                "repo_id": result.repo_id,
                "commit": result.commit,
                "files": result.files,
                "size": result.size,
                "downloaded": result.downloaded,
            }
        )
    else:
        print(
            f"pulled {result.repo_id}@{result.commit[:12]} as {result.name} "
            f"({result.files} files, {human_bytes(result.size)}): {result.path}",
            file=sys.stderr if on_stderr else sys.stdout,
        )


def ensure_model(model: str, yes: bool = False, offer: bool = True) -> None:
    """A known name (7b, 7b-chat, ...) missing from the store: offer to pull it, as `ollama run` does.

    On a terminal (stdin and stderr) the user is asked; `--yes` pulls without asking; anywhere
    else, or without `offer` (info, show, convert), the error says the exact `llamactl pull` to
    run. Other names and paths pass through untouched (their own errors come from loading).
    """
    from llamactl.pull import missing_known_model, pull_hint

    repo = missing_known_model(model)
    if repo is None:
        return
    if not yes:
        if not (offer and sys.stdin.isatty() and sys.stderr.isatty()):
            from llamactl.checkpoint import list_model_names

            names = list_model_names()
            there = f" (it has: {', '.join(names)})" if names else ""
            raise ModelNotFoundError(f"{model}: not in the store yet{there}; {pull_hint(model, repo)}")
        if not typer.confirm(f"{model} is not in the store. Pull {repo} from the Hugging Face Hub?", err=True):
            raise ModelNotFoundError(f"{model}: not pulled; {pull_hint(model, repo)}")
    pull_and_report(repo, model, on_stderr=True)


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("list")(cli_command(list_command))
    app.command("show")(cli_command(show_command))
    app.command("rm")(cli_command(rm_command))
    app.command("import")(cli_command(import_command))
    app.command("pull")(cli_command(pull_command))

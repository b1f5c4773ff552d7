"""The interactive `llamactl chat` REPL: prompt, streamed answers, slash commands, history.

All model work goes through `ChatSession`; this module only reads lines, prints with
rich, and maps commands to session calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from llamactl.cli._common import stdout
from llamactl.errors import LlamactlError, Terminated
from llamactl.sampling import SamplingParams
from llamactl.session import ChatSession
from llamactl.templates import load_dialog, save_dialog

PROMPT = ">>> "
CONTINUATION = "... "
FENCE = '"""'

HELP = [
    ("/help, /?", "this list"),
    ("/system TEXT", "set the system prompt (no TEXT: remove it); also /set system TEXT"),
    ("/reset, /clear", "start a new conversation (the system prompt stays)"),
    ("/undo", "forget the last exchange"),
    ("/retry", "answer the last message again"),
    ("/save FILE", "write the dialog as messages JSON"),
    ("/load FILE", "read a messages JSON dialog (as --dialog)"),
    ("/set NAME VALUE", "a sampling setting (/show parameters lists them; 'none' unsets)"),
    ("/set stop TEXT", "end answers before TEXT (repeatable; /set stop none clears)"),
    ("/set verbose", "timings after every answer (/set quiet: the short line)"),
    ("/show [WHAT]", "info, template or parameters (default: all)"),
    ("/tokens", "the exact token ids of the current dialog"),
    ("/stats", "context used and left, last answer's speed"),
    ("/exit, /bye", "leave (Ctrl-D works too)"),
]

# /set NAME VALUE for the sampling settings: the parser of each value.
SETTINGS: dict[str, Callable[[str], object]] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repeat_penalty": float,
    "repeat_last_n": int,
    "seed": int,
    "max_new_tokens": int,
}
UNSETTABLE = ("seed", "max_new_tokens")  # 'none' means random / until EOS


@dataclass
class ModelInfo:
    """What the banner and /show say about the loaded model."""

    name: str
    path: str
    format: str
    shape: str
    context: int
    device: str
    dtype: str


class Repl:
    """Read-eval-print loop over a ChatSession. `read` is injectable for tests (default: input)."""

    def __init__(
        self,
        session: ChatSession,
        info: ModelInfo,
        console: Console | None = None,
        history: Path | None = None,
        read: Callable[[str], str] | None = None,
    ) -> None:
        self.session, self.info = session, info
        self.console = console or stdout()
        self.history = history
        self.read = read or input
        self.verbose = False
        self.commands: dict[str, Callable[[str], bool]] = {
            "help": self.cmd_help,
            "?": self.cmd_help,
            "system": self.cmd_system,
            "reset": self.cmd_reset,
            "clear": self.cmd_reset,
            "undo": self.cmd_undo,
            "retry": self.cmd_retry,
            "save": self.cmd_save,
            "load": self.cmd_load,
            "set": self.cmd_set,
            "show": self.cmd_show,
            "tokens": self.cmd_tokens,
            "stats": self.cmd_stats,
            "exit": self.cmd_exit,
            "quit": self.cmd_exit,
            "bye": self.cmd_exit,
        }

    # -- output helpers ----------------------------------------------------------------
    def note(self, text: str, style: str = "dim") -> None:
        self.console.print(f"[{style}]{escape(text)}[/{style}]")

    def error(self, text: str) -> None:
        self.console.print(f"[bold red]error:[/bold red] {escape(text)}")

    def banner(self) -> None:
        i = self.info
        self.console.print(f"[bold]llamactl chat[/bold] · {escape(i.name)} · {i.format} · {i.shape}")
        self.note(f"context {i.context} tokens · {i.device} {i.dtype} · template {self.session.template.name}")
        self.note('Type /help for commands, """ for multi-line input, /exit or Ctrl-D to quit.')
        if self.session.system:
            self.note(f"system: {self.session.system}")
        if self.session.messages:
            self.note(f"loaded {len(self.session.dialog())} messages")

    # -- input ---------------------------------------------------------------------------
    def setup_history(self) -> None:
        if self.history is None:
            return
        with contextlib.suppress(ImportError, OSError):
            import readline

            readline.set_history_length(2000)
            if self.history.is_file():
                readline.read_history_file(str(self.history))

    def save_history(self) -> None:
        if self.history is None:
            return
        with contextlib.suppress(ImportError, OSError):
            import readline

            self.history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(str(self.history))

    def _pending_input(self) -> bool:
        """True when more pasted lines are already waiting (terminals without bracketed paste)."""
        try:
            return bool(select.select([sys.stdin], [], [], 0.02)[0])
        except (OSError, ValueError):
            return False

    def read_message(self) -> str:
        """One user entry: a line, a pasted block, or a \"\"\"-fenced block. EOFError at Ctrl-D."""
        line = self.read(PROMPT)
        if line.lstrip().startswith(FENCE):
            return self._read_fenced(line.lstrip()[len(FENCE) :])
        lines = [line]
        while self.read is input and self._pending_input():
            lines.append(self.read(""))
        self.save_history()
        return "\n".join(lines)

    def _read_fenced(self, first: str) -> str:
        if first.rstrip().endswith(FENCE):
            return first.rstrip()[: -len(FENCE)]
        lines = [first] if first.strip() else []
        while True:
            try:
                line = self.read(CONTINUATION)
            except EOFError:
                break
            if line.rstrip().endswith(FENCE):
                lines.append(line.rstrip()[: -len(FENCE)])
                break
            lines.append(line)
        self.save_history()
        return "\n".join(lines).strip("\n")

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        self.setup_history()
        self.banner()
        try:
            at_eof = self._loop()
        except KeyboardInterrupt as exc:
            # Ctrl-C then Ctrl-D typed at once: the terminal can hand readline the EOF before
            # Python runs the SIGINT handler, so the interrupt lands while we leave. Leaving wins.
            if isinstance(exc, Terminated) or not isinstance(exc.__context__, EOFError):
                raise
            self._ignore_late_interrupt()
            at_eof = True
        if at_eof:
            self.console.print()
        self.save_history()
        return 0

    def _ignore_late_interrupt(self) -> None:
        """Leaving on Ctrl-D at a real terminal: a SIGINT already on its way (Ctrl-C typed just
        before) is dropped, also one whose handler has not run yet, instead of turning exit 0
        into 130. Only for the real prompt: the process ends right after."""
        if self.read is input and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _loop(self) -> bool:
        """Read and run entries until /exit (False) or Ctrl-D (True)."""
        while True:
            try:
                text = self.read_message()
            except Terminated:
                raise
            except KeyboardInterrupt:
                self.console.print()
                self.note("(use /exit or Ctrl-D to quit)")
                continue
            except EOFError:
                self._ignore_late_interrupt()
                return True
            if not text.strip():
                continue
            try:
                if not self.dispatch(text):
                    return False
            except Terminated:
                raise
            except KeyboardInterrupt:  # landed between the guarded parts of a turn: cancel it only
                self.console.print()
                self.note("[cancelled]", style="yellow")

    def dispatch(self, text: str) -> bool:
        """Run one entry (a slash command or a message); False means leave the REPL."""
        if text.startswith("/") and not text.startswith("//"):
            return self.command(text)
        self.chat(text.removeprefix("/") if text.startswith("//") else text)
        return True

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave the REPL."""
        name, _, arg = line[1:].strip().partition(" ")
        handler = self.commands.get(name.lower())
        if handler is None:
            close = difflib.get_close_matches(name.lower(), self.commands, n=1, cutoff=0.5)
            hint = f"did you mean /{close[0]}? " if close else ""
            self.error(f"unknown command /{name}; {hint}/help lists them")
            return True
        try:
            return handler(arg.strip())
        except LlamactlError as exc:
            self.error(str(exc))
            return True

    def chat(self, text: str) -> None:
        try:
            stream = self.session.ask(text)
        except LlamactlError as exc:
            self.error(str(exc))
            return
        self.stream_answer(stream)

    def stream_answer(self, stream: Iterator[str]) -> None:
        if self.session.last_dropped:
            self.note(
                f"context full: dropped the {self.session.last_dropped} oldest exchange(s), system prompt kept",
                style="yellow",
            )
        status = None
        try:
            if self.console.is_terminal:
                status = self.console.status("", spinner="dots")
                status.start()
            for piece in stream:
                if status:
                    status.stop()
                    status = None
                self.console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        except Terminated:
            raise
        except KeyboardInterrupt:
            if status:
                status.stop()
                status = None
            with contextlib.suppress(Exception):
                stream.close()  # records the partial answer, marked cut
            self.console.print()
            self.note("[answer cut]", style="yellow")
            return
        except LlamactlError as exc:
            self.console.print()
            self.error(str(exc))
            return
        finally:
            if status:
                status.stop()
        self.console.print()
        self.note(self._answer_summary())
        if self.verbose:
            for key, value in self._timings():
                self.note(f"{key + ':':<22}{value}")

    def _answer_summary(self) -> str:
        last = self.session.last
        if last is None:
            return ""
        parts = [f"{last.new_tokens} tokens"]
        if last.tokens_per_second:
            parts.append(f"{last.tokens_per_second:.1f} tok/s")
        parts.append(f"context {self.session.context_used}/{self.session.context}")
        if last.stop_reason == "length":
            parts.append("stopped at max_new_tokens")
        elif last.stop_reason == "context":
            parts.append("stopped: context full")
        elif last.stop_reason == "stop":
            parts.append("stopped at a stop string")
        return " · ".join(parts)

    def _timings(self) -> list[tuple[str, str]]:
        """ollama's `/set verbose` block for the last answer: prompt evaluation, then decoding."""
        last = self.session.last
        if last is None:
            return []
        prompt_s = last.ttft or 0.0
        eval_s = max(0.0, last.seconds - prompt_s)

        def rate(tokens: int, seconds: float) -> str:
            return f"{tokens / seconds:.2f} tokens/s" if seconds > 0 and tokens else "n/a"

        return [
            ("total duration", f"{last.seconds * 1000:.1f} ms"),
            ("prompt eval count", f"{last.prefilled_tokens} token(s) ({last.reused_tokens} reused from the cache)"),
            ("prompt eval duration", f"{prompt_s * 1000:.1f} ms"),
            ("prompt eval rate", rate(last.prefilled_tokens, prompt_s)),
            ("eval count", f"{last.new_tokens} token(s)"),
            ("eval duration", f"{eval_s * 1000:.1f} ms"),
            ("eval rate", f"{last.tokens_per_second:.2f} tokens/s" if last.tokens_per_second else "n/a"),
        ]

    # -- commands (each returns False to leave) ------------------------------------------
    def cmd_help(self, _arg: str) -> bool:
        for name, what in HELP:
            self.console.print(f"  [bold]{escape(name):<18}[/bold] {escape(what)}")
        self.note('  """ starts and ends a multi-line message; Ctrl-C stops an answer.')
        return True

    def cmd_system(self, arg: str) -> bool:
        self.session.set_system(arg or None)
        self.note(f"system prompt set: {arg}" if arg else "system prompt removed")
        return True

    def cmd_reset(self, _arg: str) -> bool:
        self.session.reset()
        self.note("new conversation")
        return True

    def cmd_undo(self, _arg: str) -> bool:
        self.note("last exchange removed" if self.session.undo() else "nothing to undo")
        return True

    def cmd_retry(self, _arg: str) -> bool:
        self.stream_answer(self.session.retry())
        return True

    def cmd_save(self, arg: str) -> bool:
        if not arg:
            raise LlamactlError("/save needs a FILE")
        dialog = self.session.dialog()
        save_dialog(Path(arg).expanduser(), dialog)
        self.note(f"saved {len(dialog)} messages to {arg}")  # counted as /load counts them: the file's
        return True

    def cmd_load(self, arg: str) -> bool:
        if not arg:
            raise LlamactlError("/load needs a FILE")
        dialog = load_dialog(Path(arg).expanduser())
        system = dialog[0].content if dialog and dialog[0].role == "system" else None
        self.session.set_system(system)
        self.session.messages = [m for m in dialog if m.role != "system"]
        pending = " (it ends with your message: /retry answers it)" if dialog and dialog[-1].role == "user" else ""
        self.note(f"loaded {len(dialog)} messages from {arg}{pending}")
        return True

    def cmd_set(self, arg: str) -> bool:
        name, _, value = arg.partition(" ")
        name, value = name.strip().lower().replace("-", "_"), value.strip()
        if name in ("verbose", "quiet"):
            self.verbose = name == "verbose"
            self.note("timings after every answer" if self.verbose else "short summary after every answer")
            return True
        if name == "system":
            return self.cmd_system(value)
        if name == "stop":
            return self._set_stop(value)
        if name not in SETTINGS or not value:
            raise LlamactlError(f"usage: /set {{{'|'.join([*SETTINGS, 'stop', 'system', 'verbose', 'quiet'])}}} VALUE")
        if value.lower() in ("none", "off", "random") and name in UNSETTABLE:
            parsed = None
        else:
            kind = SETTINGS[name]
            try:
                parsed = kind(value)
            except ValueError:
                raise LlamactlError(
                    f"/set {name}: {value!r} is not a valid {getattr(kind, '__name__', kind)}"
                ) from None
        if name == "seed":
            self.session.reseed(parsed)  # type: ignore[arg-type]
            self.note(f"seed = {self.session.seed_used}")
            return True
        sampling: SamplingParams = dataclasses.replace(self.session.sampling, **{name: parsed})
        self.session.sampling = sampling.validate()
        self.note(f"{name} = {parsed}")
        return True

    def _set_stop(self, value: str) -> bool:
        if not value:
            raise LlamactlError("usage: /set stop TEXT (or /set stop none)")
        stops = () if value.lower() == "none" else (*self.session.sampling.stop, value)
        self.session.sampling = dataclasses.replace(self.session.sampling, stop=stops).validate()
        self.note(f"stop = {list(stops)}" if stops else "no stop strings")
        return True

    def cmd_show(self, arg: str) -> bool:
        """/show info|template|parameters, or all three."""
        i, s = self.info, self.session.sampling
        sections = {
            "info": [
                ("model", f"{i.name} ({i.path})"),
                ("format", i.format),
                ("shape", i.shape),
                ("context", f"{self.session.context} tokens"),
                ("device", f"{i.device} {i.dtype}"),
            ],
            "parameters": [
                ("temperature", s.temperature),
                ("top_p", s.top_p),
                ("top_k", s.top_k or "off"),
                ("min_p", s.min_p or "off"),
                ("repeat_penalty", s.repeat_penalty if s.repeat_penalty != 1.0 else "off"),
                ("repeat_last_n", s.repeat_last_n),
                ("stop", ", ".join(repr(x) for x in s.stop) or "(none)"),
                ("seed", self.session.seed_used),
                ("max_new_tokens", s.max_new_tokens or "until EOS"),
                ("overflow", self.session.overflow),
                ("system", self.session.system or "(none)"),
                ("verbose", "on" if self.verbose else "off"),
            ],
            "template": [("template", self._template_line())],
        }
        what = arg.strip().lower()
        if what and what not in sections:
            raise LlamactlError(f"usage: /show [{'|'.join(sections)}]")
        for key, value in [row for name, rows in sections.items() if what in ("", name) for row in rows]:
            self.console.print(f"  [bold]{key:<15}[/bold] {escape(str(value))}")
        return True

    def _template_line(self) -> str:
        template = self.session.template
        text = getattr(template, "text", None)
        return f"{template.name}: {text}" if text else template.name

    def cmd_tokens(self, _arg: str) -> bool:
        ids = self.session.token_ids()
        self.console.print(escape(str(ids)), soft_wrap=True)
        self.note(f"{len(ids)} tokens")
        return True

    def cmd_stats(self, _arg: str) -> bool:
        used = self.session.context_used
        self.console.print(f"  context   {used} used, {self.session.context - used} left of {self.session.context}")
        last = self.session.last
        if last is None:
            self.note("  no answer yet")
            return True
        tps = f"{last.tokens_per_second:.1f} tok/s" if last.tokens_per_second else "n/a"
        ttft = f"{last.ttft * 1000:.0f} ms" if last.ttft is not None else "n/a"
        self.console.print(f"  last      {last.new_tokens} tokens, {tps}, first token after {ttft}")
        self.console.print(
            f"  prompt    {last.prompt_tokens} tokens, {last.prefilled_tokens} prefilled, "
            f"{last.reused_tokens} reused from the cache"
        )
        return True

    def cmd_exit(self, _arg: str) -> bool:
        return False

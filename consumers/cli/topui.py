"""``pymap top``'s screen: a Textual app (imported by ``top`` only, never by other commands).

Textual runs on asyncio, the client library on trio: the trio part (the feed:
status requests or the event stream) runs as a trio *guest* on Textual's asyncio
loop (``trio.lowlevel.start_guest_run``), so both share one thread and the
models need no locks.  Quitting cancels the feed and waits for it to finish
before the app exits; an error that ends the feed (a daemon gone past
``--max-wait``, a map that does not exist) ends the app and is given back to
the command, which prints it as one line.

Keys: ``q`` quit, ``p`` pause, ``s``/``S`` next/previous sort column, ``1``-``9`` sort
by that column, ``r`` reverse, ``/`` filter (Enter applies, Escape clears).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import trio
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, Static

from .columns import fit_table
from .top import View

HELP = "q quit · p pause · s/S sort · 1-9 sort by column · r reverse · / filter"


class TopApp(App):
    CSS = """
    #title { height: 1; text-style: bold; }
    #table { height: 1fr; overflow: hidden; }
    #foot { dock: bottom; height: auto; }
    #filter { display: none; }
    #help { height: 1; color: $text-muted; }
    #status { height: 1; background: $panel; }
    """
    AUTO_FOCUS = None  # keys go to the bindings until / opens the filter
    BINDINGS = [  # noqa: RUF012 -- Textual's own class attribute
        Binding("q", "quit_top", "quit"), Binding("p", "pause", "pause"),
        Binding("s", "sort(1)", "sort"), Binding("S", "sort(-1)", "sort back"),
        Binding("r", "reverse", "reverse"), Binding("slash", "filter", "filter"),
        Binding("escape", "clear_filter", "clear filter"),
        *(Binding(str(n), f"sort_column({n})", show=False) for n in range(1, 10)),
    ]

    def __init__(self, view: View, feed: Callable[[], Awaitable[None]], delay: float):
        super().__init__()
        self.view = view
        self.feed = feed
        self.delay = delay
        self.paused = False
        self.error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._quitting = False

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        yield Static(id="table")
        with Vertical(id="foot"):
            yield Input(id="filter", placeholder="filter by text; Enter applies, Escape clears")
            yield Static(HELP, id="help")
            yield Static(id="status")

    # -- the trio guest --

    def on_mount(self) -> None:
        loop = asyncio.get_running_loop()
        trio.lowlevel.start_guest_run(self._trio_main, run_sync_soon_threadsafe=loop.call_soon_threadsafe,
                                      done_callback=self._trio_done,
                                      host_uses_signal_set_wakeup_fd=True)
        self.set_interval(self.delay, self.show)
        self.show()

    async def _trio_main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            if self._quitting:
                self._scope.cancel()
            await self.feed()

    def _trio_done(self, result) -> None:
        try:
            result.unwrap()
        except BaseException as e:  # noqa: BLE001 -- handed to the command, printed as one line
            self.error = e
        self.exit()

    def action_quit_top(self) -> None:
        """Cancel the feed; the app exits when it has finished (see _trio_done)."""
        self._quitting = True
        self.view.status.state = "quitting"
        if self._token is not None and self._scope is not None:
            self._token.run_sync_soon(self._scope.cancel)

    # -- the screen --

    def show(self) -> None:
        if self.paused:
            return
        table = self.query_one("#table", Static)
        status = self.query_one("#status", Static)
        status.update(self.view.status.line())
        if not self.view.ready():
            table.update("waiting for the daemon...")
            return
        try:
            self.view.check_sort()
        except ValueError as e:
            self.error = e
            self.action_quit_top()
            return
        size = table.size
        columns, cells, _ = self.view.table(max(size.height - 4, 1))
        rendered, _ = fit_table(self.console, columns, cells, size.width)
        self.query_one("#title", Static).update(self.view.title())
        table.update(rendered)
        self.view.status.refreshes += 1

    def action_pause(self) -> None:
        self.paused = not self.paused
        status = self.query_one("#status", Static)
        status.update(("PAUSED (p resumes)  " if self.paused else "") + self.view.status.line())
        if not self.paused:
            self.show()

    def _sort_by(self, name: str) -> None:
        self.view.by = name
        self.show()

    def action_sort(self, step: int) -> None:
        sorts = self.view.sorts()
        current = self.view.by or (self.view.keys.fields[0] if self.view.keys is not None
                                   and self.view.keys.fields else
                                   "changes" if self.view.keys is not None else "events")
        i = sorts.index(current) if current in sorts else 0
        self._sort_by(sorts[(i + step) % len(sorts)])

    def action_sort_column(self, n: int) -> None:
        sorts = self.view.sorts()
        if n <= len(sorts):
            self._sort_by(sorts[n - 1])

    def action_reverse(self) -> None:
        self.view.reverse = not self.view.reverse
        self.show()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.value = self.view.text
        box.focus()

    def on_input_submitted(self, message: Input.Submitted) -> None:
        self.view.text = message.value
        message.input.display = False
        self.set_focus(None)
        self.show()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = False
        box.value = ""
        self.view.text = ""
        self.set_focus(None)
        self.show()


def run_screen(view: View, feed: Callable[[], Awaitable[None]], delay: float) -> None:
    """Run the screen until ``q`` (or the feed ends); re-raise what ended the feed."""
    app = TopApp(view, feed, delay)
    app.run()
    if app.error is not None and not isinstance(app.error, trio.Cancelled):
        raise app.error

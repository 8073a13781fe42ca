"""Stand-ins for CUDA streams and events that log what a transport asks of them."""

import contextlib


class Recorder:
    """Streams and events that log what the transport asks of them; events finish after `delay` polls."""

    pinned = False

    def __init__(self, delay: int):
        self.log, self.delay = [], delay
        self.main = self.new_stream("main")

    def current(self):
        return self.main

    def new_stream(self, name=None):
        return FakeStream(self.log, name or f"side{sum(1 for e in self.log if e[0] == 'new_stream')}")

    def new_event(self):
        return FakeEvent(self.log, self.delay)

    @contextlib.contextmanager
    def use(self, stream):
        self.log.append(("enter", stream.name))
        yield
        self.log.append(("exit", stream.name))


class FakeStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event))

    def synchronize(self):
        self.log.append(("synchronize", self.name))


class FakeEvent:
    def __init__(self, log, delay):
        self.log, self.delay, self.pending = log, delay, 0
        self.blocked = 0  # synchronize() calls that had to wait for the work to finish

    def record(self, stream):
        self.log.append(("record", self, stream.name))
        self.pending = self.delay

    def query(self):
        if self.pending:
            self.pending -= 1
            return False
        return True

    def synchronize(self):
        self.log.append(("event_sync", self))
        self.blocked += bool(self.pending)
        self.pending = 0

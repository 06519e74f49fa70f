"""What ObfuscationPrivacy's panel needs from its logic: ``ObfuscationPrivacyLogic`` is the real one, in-app widget
tests inject a fake (``testing.FakeObfuscationPrivacyLogic``). Only these members are the widget's contract."""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

Progress = Callable[[str, Optional[float]], None]
OnDone = Callable[[Any], None]
OnError = Callable[[str, str], None]  # (one-line message, kind: input | server | cancelled | internal)


class ObfuscationPrivacyLogicProtocol(Protocol):
    def describe_key(self, key_dir) -> str:
        """One line about the key in ``key_dir``; raises MedPrivacyError when there is none."""

    def start_key_generation(
        self,
        key_dir,
        force: bool = False,
        vae_from=None,
        on_progress: Optional[Progress] = None,
        on_done: Optional[OnDone] = None,
        on_error: Optional[OnError] = None,
    ) -> Any:
        """Start creating the site key in a worker process; returns the worker (``cancel()``). ``on_done(its
        description)`` or ``on_error(one-line message, kind)`` from Qt's event loop, as for every ``start_*``."""

    def node_to_frames(self, node) -> Any:
        """The node's frames (``NodeFrames``: ``pixels``, ``name``, ``index_values``); InputError if unusable."""

    def frames_to_node(self, codes, source, name: Optional[str] = None) -> Any:
        """A new node holding obfuscated frames, on ``source``'s geometry (main thread)."""

    def start_obfuscation(
        self,
        pixels,
        key_dir,
        on_progress: Optional[Progress] = None,
        on_done: Optional[OnDone] = None,
        on_error: Optional[OnError] = None,
    ) -> Any:
        """Start obfuscating the frames in a worker; ``on_done((codes, key id))``, as a server would receive them."""

    def test_connection(self, url: str, token: Optional[str] = None, ca_bundle: Optional[str] = None) -> str: ...

    def list_models(self, url: str, token: Optional[str] = None, ca_bundle: Optional[str] = None, key_dir=None) -> list:
        """The server's models trained with this key (a short call: runs in a ``BackgroundJob`` thread)."""

    def start_classification(
        self,
        pixels,
        key_dir,
        url: str,
        model: str,
        token: Optional[str] = None,
        ca_bundle: Optional[str] = None,
        on_progress: Optional[Progress] = None,
        on_done: Optional[OnDone] = None,
        on_error: Optional[OnError] = None,
    ) -> Any:
        """Start obfuscating the frames and classifying them on the server in a worker; ``on_done(answer)``."""

    def start_training(
        self,
        dataset,
        key_dir,
        url: str,
        token: Optional[str] = None,
        ca_bundle: Optional[str] = None,
        steps: Optional[int] = None,
        name: Optional[str] = None,
        on_progress: Optional[Progress] = None,
        on_done: Optional[OnDone] = None,
        on_error: Optional[OnError] = None,
    ) -> Any:
        """Start training a model on the server from a dataset folder or CSV in a worker; ``on_done(job)``. Cancel
        cancels the server's job too."""

    def results_table(self, answer: dict, name: str = "Obfuscated classification", frame_labels=None) -> Any:
        """A table node with one row per frame (main thread)."""

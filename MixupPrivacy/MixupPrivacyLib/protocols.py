"""What MixupPrivacy's panel needs from its logic: ``MixupPrivacyLogic`` is the real one, in-app widget tests inject
a fake (``testing.FakeMixupPrivacyLogic``). Only these members are the widget's contract with the logic."""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

Progress = Callable[[str, Optional[float]], None]
OnError = Callable[[str, str], None]  # (one-line message, kind: input | server | cancelled | internal)


class MixupPrivacyLogicProtocol(Protocol):
    #: Volume nodes added by the last ``apply_result``: what the server received, and what it could rebuild.
    last_uploaded_node: Any
    last_rebuild_node: Any

    def volume_node_to_sitk(self, volume_node) -> Any:
        """The node as a SimpleITK image; raises InputError for anything that cannot be segmented."""

    def test_connection(self, url: str, token: Optional[str] = None, ca_bundle: Optional[str] = None) -> str:
        """One line describing the server (a short call: runs in a ``BackgroundJob`` thread)."""

    def start_key_generation(
        self,
        key_dir,
        force: bool = False,
        on_progress: Optional[Progress] = None,
        on_done: Optional[Callable[[Any], None]] = None,
        on_error: Optional[OnError] = None,
        **options,
    ) -> Any:
        """Start creating the private key in ``key_dir`` in a worker process; returns the worker (``cancel()``).
        ``on_done(key folder)``, or ``on_error(one-line message, kind)``, from Qt's event loop."""

    def start_segmentation(
        self,
        input_node,
        url: str,
        token: Optional[str] = None,
        ca_bundle: Optional[str] = None,
        key_dir=None,
        tta: Optional[int] = None,
        unmix: str = "learned",
        output_segmentation_node=None,
        show_uploaded: bool = False,
        seed: Optional[int] = None,
        privacy: Optional[str] = None,
        show_rebuild: bool = False,
        on_progress: Optional[Progress] = None,
        on_done: Optional[Callable[[Any], None]] = None,
        on_error: Optional[OnError] = None,
    ) -> Any:
        """Start the private segmentation of ``input_node`` in a worker process; returns the worker. When it
        answers, the result is put into the scene (``last_uploaded_node``, ``last_rebuild_node`` set) and
        ``on_done(segmentation node)`` runs; failures reach ``on_error(one-line message, kind)``."""

"""Code the MedPrivacy scripted modules (MixupPrivacy, MedLockerWatermark, ObfuscationPrivacy) share: the panel base
(``widgets``, needs Qt), the dependency install step (``dependencies``), ``onReload`` (``reloading``), panel-test
helpers (``testing``) and MRML geometry (``mrml_geometry``).

Kept out of the core package, which never imports Qt or Slicer. This package file imports nothing, so the modules'
Libs can check that it is on ``sys.path`` without Qt; ``widgets`` is imported only by the Libs' ``widget.py``, which
the module files import only where the application is; ``worker`` (the app side of the worker process,
``medprivacy.worker``) imports Qt only inside the class that runs ``QProcess``, so the Libs and CI use it too.
Installed next to the scripted modules, like ``medprivacy`` (top-level CMakeLists.txt).
"""

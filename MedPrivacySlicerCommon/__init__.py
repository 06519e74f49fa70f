"""Widget code shared by the MedPrivacy scripted modules (MixupPrivacy, MedLockerWatermark).

Kept out of the core package, which never imports Qt or Slicer. This package file imports nothing, so the modules'
Libs can check that it is on ``sys.path`` without Qt; ``widgets`` needs the application (Qt and ``slicer.util``)
and is imported only inside the module files' ``if _HAVE_APP:`` guard; ``worker`` (the app side of the worker process,
``medprivacy.worker``) imports Qt only inside the class that runs ``QProcess``, so the Libs and CI use it too.
Installed next to the scripted modules, like ``medprivacy`` (top-level CMakeLists.txt).
"""

"""MedLocker (Pu et al.): visible adversarial watermarks that mislead unauthorised classifiers, removable with a key.

``blending``  alpha blending of a logo (paper eq. 1-2) and the default lock logo
``boxes``     where the logo may go: lesion mask -> boxes -> feasible top-left positions (sec. 2.2)
``optimizer`` evolution strategy with basin-hopping mutation over (alpha, x, y) (eq. 3-6, 8)
``key``       the key in memory: parameters and the original pixels under each logo, unlock (eq. 9)
``keyfile``   that key encrypted and authenticated on disk

Pure numpy/scipy/cryptography: no slicer, qt or torch import; the models that score candidates live elsewhere.
"""

from __future__ import annotations

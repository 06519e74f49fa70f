"""ObfuscationPrivacy (Popescu et al. 2022): a remote service trains and runs classifiers on frames it cannot read back.

Only the paper's abstract exists: "a variational autoencoder (VAE) with random non-bijective pixel intensity mapping".
Everything below is our design where it is silent, each choice measured (``medprivacy obfuscate eval`` and
``bench/obfuscation_tradeoff.py``; figures in the README and ``bench/results/``).

The chain, per frame (``transform.Obfuscator``)::

    frame (any size, 8/16-bit, int or float)
      -> normalise: stretch its 0.5th..99.5th percentile to 0..1            (no secret)
      -> resize to the VAE's 64x64 (bilinear, antialiased)                  (no secret)
      -> VAE encoder: posterior mean mu
      -> z = mu + t * s * eps            eps ~ N(0, I), keyed per frame      (random per image)
      -> VAE decoder: a smooth frame y in [0, 1]
      -> y + (d / Q) * n                 n ~ N(0, 1), keyed per pixel        (random per pixel)
      -> quantise to Q levels, table[level] -> one of K codes             (random per site: the table)
      -> uint8 codes, 64x64: the only thing that leaves the computer

Where the VAE sits, and why. First: it needs intensities (a mapping applied before it would leave it nothing it was
trained on), it is the information bottleneck that drops fine detail (thin branches, texture, noise), and its
latent space is where per-frame randomness changes *what* the frame shows rather than adding pixel noise. The
mapping comes last so that what does survive is hidden from a person and from any decoder that lacks the table.

What is random, and from where. Per site (``key.py``, the key folder): the table, a balanced assignment of the Q
quantised levels to K codes (Q/K levels per code, so the mapping is many-to-one and has no inverse) in an order
shuffled by the operating system's CSPRNG (``secrets.SystemRandom``), and a 32-byte secret; the VAE weights too when
the site fine-tunes its own (``keygen --vae-from``). Per frame: eps, and per pixel: n, both drawn from a ChaCha20
keystream keyed by HMAC-SHA256(secret, frame's pixels). So the same frame always gives the same codes under one key
(a dataset can be obfuscated again, and training and inference agree), nobody without the key can reproduce or
predict the noise, and two keys give independent codes (about 1/K of the pixels agree).

Measured reasons for the details:
- ``s`` is the per-dimension spread of mu over the VAE's training frames, not the posterior's own sigma: decoding
  mu + sigma * eps changed no measurable pixel (design sweep: output-vs-original SSIM 0.4256 with, 0.4258 without),
  because a trained VAE keeps sigma tiny on the dimensions the decoder uses. With ``s``, t = 1 moves a frame about
  as far as real frames differ from each other.
- The dither: the VAE output is smooth, so without it a table keeps its level sets: every code region is one band
  of intensities, and the vessel outlines show as contour lines (see the design notes in the README). With a dither
  of about a level, neighbouring pixels of nearly equal intensity get unrelated codes; what survives is the local
  mix of codes, a statistic the server's classifier can learn from and a person cannot read.
- The server's classifier reads local code histograms (``classifier.py``): a learned per-code embedding at full
  resolution, or codes read as intensities, fitted the training frames perfectly and stayed near chance on new
  ones (design sweep, LUT-only frames: 0.56-0.72 test accuracy; the histogram front end: 0.83 on 3000 frames,
  0.935 on 12000).
- Frames are 64x64 so that the VAE, the classifiers and every attack network train on one CPU core in minutes.

Defaults (``DEFAULT_*`` below) are chosen from the measured trade-off between the classifier's accuracy and the
strongest attacks; the README gives the curve and the reason for the point chosen.

Modules: ``data`` (synthetic angiograms, fundus crops), ``key`` / ``keygen`` (the site key), ``vae``,
``transform``, ``io`` (files), ``dataset`` (labelled folders and CSVs), ``classifier`` (what servers train),
``attacks`` (threat models a and b, measures), ``evaluate``, ``train`` (shipped weights), ``cli``, ``demo``. The core
never imports slicer or qt.
"""

from __future__ import annotations

#: Quantisation levels Q of the VAE output.
DEFAULT_LEVELS = 32
#: Output codes K: Q / K = 4 levels share each code.
DEFAULT_CODES = 8
#: Dither d, in quantisation levels (standard deviation).
DEFAULT_DITHER = 1.0
#: Latent temperature t, in units of the spread of real frames' latent means.
DEFAULT_TEMPERATURE = 0.5

"""Tissue labels shared by the server, the client, the CLI and the Slicer module."""

from __future__ import annotations

BACKGROUND = 0
CSF = 1
GRAY_MATTER = 2
WHITE_MATTER = 3
NUM_CLASSES = 4

#: label value -> (segment name, RGB in 0..1). Colours follow Slicer's GenericAnatomyColors table
#: ("cerebrospinal fluid", "gray matter", "white matter") so overlays look as radiologists expect.
TISSUE_SEGMENTS = {
    CSF: ("CSF", (85 / 255, 188 / 255, 255 / 255)),
    GRAY_MATTER: ("Gray matter", (200 / 255, 200 / 255, 235 / 255)),
    WHITE_MATTER: ("White matter", (250 / 255, 250 / 255, 225 / 255)),
}

"""Cellpose 4 dynamics: flows from masks, masks from flows, and label-image utilities.

One module per job: ``labels`` (label-image utilities), ``flows`` (masks -> flows), ``following``
(flows -> masks: Euler steps, seeds), ``flow_check`` (the flow-error check), ``postprocess`` (holes,
small masks, stitching, diameters), ``outlines``, ``flow_picture`` (flows as colours), ``masks``
(``compute_masks``, the whole path), ``device_path`` (the same on the device, for CUDA) and
``device_setup`` (device, CPU threads, which path).

Everything here reproduces Cellpose 4.2.1.1 (``cellpose.dynamics`` / ``cellpose.utils``) and is written
from the documented behaviour (see ``shared/reference/CELLPOSE_FACTS.md`` sections 3 and 4).

Conventions
-----------
- Label images: (Y, X) or (Z, Y, X) integer arrays, 0 = background, 1, 2, ... = objects.
- Flows: float32 (2, Y, X) = [dY, dX] or (3, Z, Y, X) = [dZ, dY, dX]. ``masks_to_flows`` gives unit
  vectors; the network predicts about 5x those ("network units").
- ``device``: None (CPU) or a ``torch.device`` / device string. Inputs and outputs are numpy arrays;
  the heavy loops run in torch on that device.

Speed notes (equal results, less work than Cellpose):
- Heat diffusion runs as dense sums of shifted images (3x3 in 2D, 7-point in 3D, same summation order
  as Cellpose, so the heat is bit-identical), with a per-pixel gather only where two labels touch.
- Euler integration drops duplicate trajectories: pixels whose float32 positions became identical
  follow the same path from then on, so only one of them is integrated.
- The flow check (``flow_error`` in 2D) runs each object only for the steps its own size needs
  (2 * (height + width + 2), where Cellpose uses the largest object's count for all), in phases on
  shrinking boxes: once the objects that still need steps fit in half the area, only that box goes on.
  A large blob then costs its own box, not the whole image for its steps. Objects whose error lands
  within 0.05 of the threshold are recomputed with Cellpose's count, so keep/remove decisions match.
- Seed growth runs for all seeds at once as a 5-step max-dilation of a "seed rank" image limited to
  histogram bins with more than 2 hits; the highest-ranked (largest) seed wins overlaps, as in Cellpose.
- On CUDA, ``device_path`` runs the whole chain in torch on the device (vectorised, a constant number of
  host syncs per image, the label image downloaded once; masks identical to the host path, which the
  tests check by running it on the CPU with ``device_setup.device_path_on_cpu()``).
- On the CPU the loops (hundreds of small torch ops) run with one intra-op thread: on a shared machine
  torch's thread barriers made them 4-17x slower with 2 threads. Set the environment variable
  CELLPOSE_WEB_DYNAMICS_THREADS (e.g. 2) to allow more on a dedicated machine.
"""
from __future__ import annotations

from cellpose_web.engine.dynamics.flows import masks_to_flows, labels_to_flows  # noqa: F401
from cellpose_web.engine.dynamics.following import follow_flows, get_masks  # noqa: F401
from cellpose_web.engine.dynamics.flow_check import flow_error, remove_bad_flow_masks  # noqa: F401
from cellpose_web.engine.dynamics.postprocess import fill_holes_and_remove_small_masks, stitch3D, remove_edge_masks, diameters  # noqa: F401
from cellpose_web.engine.dynamics.outlines import masks_to_outlines, outlines_list  # noqa: F401
from cellpose_web.engine.dynamics.flow_picture import dx_to_circ  # noqa: F401
from cellpose_web.engine.dynamics.masks import compute_masks  # noqa: F401

__all__ = ["masks_to_flows", "labels_to_flows", "follow_flows", "get_masks", "compute_masks", "flow_error", "remove_bad_flow_masks", "fill_holes_and_remove_small_masks", "stitch3D", "remove_edge_masks", "diameters", "masks_to_outlines", "outlines_list", "dx_to_circ"]

"""The numerical engine: networks (nets/), dynamics (flows <-> masks), transforms, metrics, device
choice, mask editing and synthetic images. Imports nothing from the layers above."""

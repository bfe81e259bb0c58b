"""Workflows: multi-step procedures built on the engine, training, I/O and the registry.

Layering: engine -> models / train -> io / registry / measure -> **workflows** -> service -> ui.
A workflow module may import the layers below it; the service and the browser call into it.

- :mod:`cellpose_web.workflows.hitl` — human-in-the-loop: the model learns while a person corrects.
"""

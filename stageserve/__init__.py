"""stageserve, the layer above the two services: the `stageserve` command and its launcher,
the demo model, and the clients a user imports (`stageserve.client`, `stageserve.async_client`).

Imports go down only: this package may import `router`, `stage_worker` and `shared`; none of
them imports it.
"""

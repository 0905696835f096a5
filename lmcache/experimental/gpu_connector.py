"""The seed's ``lmcache.experimental.gpu_connector``: the contract in
`lmcache.abc.gpu_connector`, the connectors in `lmcache.builtin.connectors`."""

from lmcache.abc.gpu_connector import ConnectorContext, GPUConnectorInterface
from lmcache.builtin.connectors.cpu_blocks import VLLMCPUBlockConnector, VLLMMLABlockConnector
from lmcache.builtin.connectors.nested_tuple import VLLMNestedTupleGPUConnector
from lmcache.builtin.connectors.paged import (
    VLLMPagedMemGPUConnector,
    VLLMPagedMemGPUConnectorV2,
)

__all__ = [
    "ConnectorContext",
    "GPUConnectorInterface",
    "VLLMCPUBlockConnector",
    "VLLMMLABlockConnector",
    "VLLMNestedTupleGPUConnector",
    "VLLMPagedMemGPUConnector",
    "VLLMPagedMemGPUConnectorV2",
]

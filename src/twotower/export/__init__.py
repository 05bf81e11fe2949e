"""Export: a run's towers as standalone ONNX or TorchScript models, with the item embeddings, the
vocabularies and the score convention, for serving outside this package (``twotower export``).

The last stage of the data flow: it reads a run (``run``), calls the towers (``model``) and lays the
item vectors out as the index does (``index``).
"""
from .bundle import DESCRIPTION, export_run, read_description, score_convention
from .formats import FORMATS, OnnxTower, TorchScriptTower, embedding_bag_onnx
from .towers import ExportError, TowerExport, TowerSignature, signature

__all__ = ["export_run", "read_description", "score_convention", "DESCRIPTION", "FORMATS", "OnnxTower", "TorchScriptTower",
           "embedding_bag_onnx", "ExportError", "TowerExport", "TowerSignature", "signature"]

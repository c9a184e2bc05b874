"""The data pipeline: loose-JSON and indexed datasets, GPT-2 sampling, samplers, demo corpus."""

from megatron.data.builder import build_train_valid_test_datasets
from megatron.data.errors import DataError, IndexedDatasetError, LooseJSONError
from megatron.data.samplers import MegatronPretrainingSampler, build_data_loader

__all__ = ["DataError", "IndexedDatasetError", "LooseJSONError", "MegatronPretrainingSampler",
           "build_data_loader", "build_train_valid_test_datasets"]

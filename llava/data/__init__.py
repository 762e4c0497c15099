"""Training data: LLaVA instruction JSON (`instruct`), image-caption webdataset shards (`pairs`), image decoding
(`images`), batching (`collate`) and length-grouped sampling by modality (`sampler`)."""
from llava.data.collate import Collator
from llava.data.errors import DataError
from llava.data.instruct import InstructDataset
from llava.data.pairs import PairDataset, items_from_folder, items_from_json, write_shards
from llava.data.sampler import ModalityLengthGroupedSampler, padding_waste

__all__ = ["Collator", "DataError", "InstructDataset", "ModalityLengthGroupedSampler", "PairDataset",
           "items_from_folder", "items_from_json", "padding_waste", "write_shards"]

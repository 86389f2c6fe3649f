"""The data flow's first stages: word list -> vocabulary -> context windows -> splits.

    names.py     the default data set (names.txt): $BACKPROP_NINJA_DATA, the cache, or a verified download
    words.py     reading a word list; the lectures' random.seed(42) 80/10/10 split
    vocab.py     characters <-> token ids, with the end token 0
    windows.py   (block_size context, next token) pairs; distinct contexts for evaluation
    sequences.py whole words, one row each: [start] + chars -> chars + [end], padded
    dataset.py   all of it for one word list: Dataset, load_dataset
"""

from backprop_ninja.data.dataset import VIEWS, Dataset, load_dataset
from backprop_ninja.data.names import DATA_ENV, NAMES_FILE, resolve_names
from backprop_ninja.data.vocab import END_TOKEN, Vocabulary
from backprop_ninja.data.sequences import MAX_WORD_LENGTH, build_sequences, sequence_block_size
from backprop_ninja.data.windows import Contexts, Split, build_dataset, distinct_contexts
from backprop_ninja.data.words import read_words, split_words

__all__ = [
    "DATA_ENV", "END_TOKEN", "MAX_WORD_LENGTH", "NAMES_FILE", "VIEWS", "Contexts", "Dataset", "Split", "Vocabulary",
    "build_dataset", "build_sequences", "distinct_contexts", "sequence_block_size", "load_dataset", "read_words", "resolve_names", "split_words",
]

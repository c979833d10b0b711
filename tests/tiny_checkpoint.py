"""Build a tiny BGE-M3-shaped checkpoint for tests: no download, a few seconds on CPU.

Same folder layout as the published BAAI/bge-m3 snapshot (config.json,
model.safetensors, tokenizer files, sparse_linear.pt, colbert_linear.pt),
random weights from a small XLM-R config, and an XLM-R-style Unigram
tokenizer trained here (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

TRAINING_TEXT = """
The Moon orbits the Earth once every twenty-seven days and shows phases.
Saturn has bright rings made of ice and rock, visible through a small telescope.
Bread rises because yeast ferments sugar and releases carbon dioxide gas.
The high-speed train left the station on time and reached the coast at noon.
Compost needs green and brown material, air and water to break down quickly.
Der Mond ist aufgegangen, die goldnen Sternlein prangen am Himmel hell und klar.
Der Zug fährt um acht Uhr vom Hauptbahnhof ab und kommt am Abend in Berlin an.
Le pain au levain demande du temps, de la farine, de l'eau et du sel.
La lune éclaire la mer et les bateaux rentrent au port avant la nuit.
El pulpo tiene tres corazones y sangre azul, y vive en el fondo del océano.
La estación de tren estaba llena de viajeros que esperaban el último tren.
Early computers filled whole rooms and used vacuum tubes instead of transistors.
Tomatoes need sun, warmth and regular watering to ripen in the garden.
""".strip().splitlines()


def build_tokenizer(vocab_size: int = 400) -> XLMRobertaTokenizerFast:
    tokenizer = Tokenizer(models.Unigram())
    # The real XLM-R tokenizer.json's pipeline (less its SentencePiece charsmap normaliser): whitespace split,
    # then Metaspace. transformers 5 rebuilds XLM-R tokenizers with exactly this, whatever tokenizer.json says,
    # so the test tokenizer must agree with it for bge_index.model.tokenizer (tokenizer.json as written) to match.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>",
                                      special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(TRAINING_TEXT * 20, trainer)
    tokenizer.add_special_tokens(["<mask>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return XLMRobertaTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def build_checkpoint(folder: Path, hidden: int = 32, layers: int = 2, heads: int = 4, max_positions: int = 514,
                     colbert_dim: int | None = None, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """Write a checkpoint to `folder` and return it.

    With the default initializer_range every text gets nearly the same dense vector (random attention is
    almost uniform); a larger one spreads them, for tests that compare dense rankings across engines.
    """
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=max_positions, type_vocab_size=1,
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2, architectures=["XLMRobertaModel"],
        initializer_range=initializer_range,
    )
    model = XLMRobertaModel(config, add_pooling_layer=True).eval()
    model.save_pretrained(folder, safe_serialization=True)
    sparse = torch.nn.Linear(hidden, 1)
    colbert = torch.nn.Linear(hidden, colbert_dim or hidden)
    # fp16 on disk, as in the published snapshot
    torch.save({k: v.half() for k, v in sparse.state_dict().items()}, folder / "sparse_linear.pt")
    torch.save({k: v.half() for k, v in colbert.state_dict().items()}, folder / "colbert_linear.pt")
    return folder

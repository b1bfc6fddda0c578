"""tinker-cookbook's supervised recipe (tinker_cookbook.supervised.train), as
it ships, on the cookbook's own example conversations and a Signal testnet's
embedded model (testnet/tinker_test.go).

Usage: python cookbook_sft.py BASE_URL MODEL LOG_DIR STEPS
(TINKER_API_KEY in the environment; the tokenizer of MODEL in the Hugging
Face cache at HF_HOME, offline.)
"""

import asyncio
import json
import os
import sys

import tinker_cookbook
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

base, model, log, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = os.path.join(os.path.dirname(tinker_cookbook.__file__), "example_data", "conversations.jsonl")
common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=model, renderer_name="role_colon", max_length=256,
                                        batch_size=8, train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES)
cfg = train.Config(log_path=log, model_name=model, recipe_name="signal_testnet", renderer_name="role_colon",
                   dataset_builder=FromConversationFileBuilder(common_config=common, file_path=data),
                   learning_rate=2e-3, num_epochs=1, lora_rank=8, base_url=base, save_every=0, eval_every=0,
                   max_steps=steps)
asyncio.run(train.main(cfg))
rows = [json.loads(l) for l in open(os.path.join(log, "metrics.jsonl"))]
ckpts = [json.loads(l) for l in open(os.path.join(log, "checkpoints.jsonl"))]
print("RESULT " + json.dumps({"what": "cookbook", "nll": [r["train_mean_nll"] for r in rows if "train_mean_nll" in r],
                              "checkpoints": ckpts}))

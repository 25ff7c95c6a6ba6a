"""Generation engines behind one interface (`base.Engine`): ours (`alisa`) and the HF transformers
baseline (`hf`). `base` holds the step loop and stopping, `lm` the model over a batch, `sampling` the
token choice.

May import: `runner.spec`, `runner.units`, `runner.data`, `runner.memory`, `runner.model`, `policies`,
`runner.kv`."""

"""The model: loading a base from a preset, a folder or a GGUF file (``loading``, ``gguf``, ``tokenizer``), splitting
it into segments (``split``, ``plan``), LoRA (``lora``), the losses (``loss``), dtypes (``precision``), memory
planning (``memory``), the defense at the cut (``defense``) and the split's equivalence check (``equivalence``)."""

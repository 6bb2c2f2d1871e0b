"""What the agent and the coordinator share, in layers (nothing is imported here, so importing one part loads
only what it needs):

- ``errors``: the one exception tree and the exit codes;
- ``wire``: what travels between them: topics and message kinds, the envelope, message bodies, the tensor
  codec, the broker settings and the MQTT link;
- ``model``: model loading and splitting, LoRA, losses, precision and memory;
- ``job``: the job file, data files, the length-Dirichlet partition;
- ``profiles``: the device classes of ``firmware_profiles/``.
"""

__version__ = "0.1.0"

"""What travels between the members of a job: topics and message kinds (``topics``), the envelope with its
authentication and chunking (``envelope``), message bodies (``messages``, ``control``, with ``fields``), tensors
(``codec``), how to reach the broker (``broker``) and the MQTT link itself (``link``, with ``queues``)."""

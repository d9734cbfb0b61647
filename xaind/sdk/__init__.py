"""What a participant needs to take part in xaind's federated training.

Subclass `Participant`, implement `train_round`, and call
`run_participant(participant, coordinator_url)` from plain blocking code, or
`start_participant(...)` from Twisted code. Weights travel in the wire
format for you; heartbeats run beside the training; network errors are
retried with backoff.
"""

from xaind.sdk.participant import Participant, ParticipantError
from xaind.sdk.runner import ParticipantSummary, run_participant, start_participant

__all__ = ["Participant", "ParticipantError", "ParticipantSummary", "run_participant", "start_participant"]

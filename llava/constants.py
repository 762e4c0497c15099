"""Constants shared with the LLaVA reference, so data and checkpoints mean the same thing in both."""

IGNORE_INDEX = -100  # label of a position that is not trained on (prompt, image, padding)
IMAGE_TOKEN_INDEX = -200  # placeholder id inside input_ids where an image's features are spliced in
DEFAULT_IMAGE_TOKEN = "<image>"  # the text tag that marks an image inside a conversation turn

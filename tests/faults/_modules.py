"""Module subclasses for the fault tests."""

from vapo_pl import VAPOModule


class LongPrompts(VAPOModule):
    """Pads every prompt past any sensible max_prompt_length: only the DataModule's setup can see it."""

    def build_prompt(self, record, tokenizer, template):
        return "x" * 200 + record.prompt

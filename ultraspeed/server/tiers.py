"""The two products served from one model: the same weights under two model ids.

    "<name>"             standard: plain decoding, original weights, price 1x, the larger share of the capacity
    "<name>-ultraspeed"  MXFP4 experts (when the server loaded them) + DFlash speculative decoding (when a drafter
                         is loaded), price 3x, fewer concurrent requests

A tier is also its engine's scheduling group (same name), so its capacity is enforced where requests are admitted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ultraspeed.engine.scheduler import GroupConfig


@dataclass(frozen=True)
class Tier:
    name: str                   # "standard" | "ultraspeed"
    model_id: str               # what clients send as "model"
    price_multiplier: float     # times the base prices
    max_running: int            # requests decoding at once; more wait in the engine queue
    speculative: bool           # asks for the drafter (used only if one is loaded)
    experts: str = "original"   # expert weights it decodes with: "original" | "mxfp4"

    def group(self) -> GroupConfig:
        return GroupConfig(self.name, self.max_running, self.speculative)


def make_tiers(model_name: str, standard_max_running: int, ultraspeed_max_running: int,
               ultraspeed_multiplier: float, ultraspeed_experts: str = "original") -> tuple[Tier, Tier]:
    return (Tier("standard", model_name, 1.0, standard_max_running, speculative=False),
            Tier("ultraspeed", f"{model_name}-ultraspeed", ultraspeed_multiplier, ultraspeed_max_running,
                 speculative=True, experts=ultraspeed_experts))

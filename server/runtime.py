"""Everything the server holds once the model is up: base model, registry, engine, scheduler."""

import logging
from dataclasses import dataclass

from loraplex.basemodel import LoadedBase, load_base_model
from loraplex.settings import Settings

log = logging.getLogger("loraplex")


@dataclass
class Runtime:
    settings: Settings
    base: LoadedBase

    @classmethod
    def start(cls, settings: Settings, base: LoadedBase | None = None) -> "Runtime":
        """Blocking: loads the model (unless given) and starts the engine. Run it off the event loop."""
        if base is None:
            log.info("loading base model %s", settings.base_model or "(embedded SmolLM2-135M-Instruct)")
            base = load_base_model(settings.base_model, cache_dir=settings.cache_dir, device=settings.device,
                                   served_name=settings.served_model_name)
        log.info("base model %s ready on %s", base.served_name, base.device)
        return cls(settings, base)

    def stop(self) -> None:
        pass

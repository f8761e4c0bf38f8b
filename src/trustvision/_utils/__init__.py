"""Private helpers shared by every layer: the name registry, device resolution, image/tensor
helpers, atomic JSON/bytes writes. Nothing here imports a trustvision layer (data, models, ...)."""

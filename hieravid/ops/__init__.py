"""Pure tensor operators of the three HieraVid levels. They know nothing about modules or models."""

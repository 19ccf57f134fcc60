"""InferenceGuard: cost and reward models (`scoring`, `latent`), what the stream's cost check
reads (`checks`), the latent critic, the safety-budgeted search, and their stored form.
"""

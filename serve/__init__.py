"""nsft-ray serving: aligned VLMs behind OpenAI-compatible HTTP on Ray Serve, with a playground.

serve.api builds the FastAPI app without Ray; serve.app wraps it in Ray Serve deployments.
"""

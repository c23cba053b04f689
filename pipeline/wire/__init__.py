"""The wire: messages and their format, ZeroMQ transport, CURVE security, the mask-feed client
and the prompt-control client.
"""

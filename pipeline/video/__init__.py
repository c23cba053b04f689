"""Video in: sources (files, FFmpeg test sources, RTSP, webcams) through PyAV, timestamp
repair, live sources that reconnect.
"""

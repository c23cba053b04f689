"""Outputs: the files a run writes (instance-id PNGs, COCO-RLE JSON lines, MOT tracks, the
overlay video) and the overlay drawing.
"""

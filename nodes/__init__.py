"""The four node kinds of a samstream graph: decoder, encoder, tracker, publisher."""

"""The deep part: a torchvision trunk and the projection W that map an image to its vector u = W·f
(``encoder``)."""

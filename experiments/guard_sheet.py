# Experiment script (2026-12-06): the sheet of docs/results.md "A flat guard on the fidelity module" from two
# benchmarks/sr_photos.py sheets (served before, guard 0.01), whole photographs, mild-64px.
import numpy as np
from PIL import Image, ImageDraw
A=Image.open('/work/runs/fid2/serve-flat3k-mild-64px/sheet.png').convert('RGB')
B=Image.open('/work/runs/guard/serve-g0.01-mild-64px/sheet.png').convert('RGB')
W=A.size[0]//4
rows={"astronaut whole (128x128 in)":(426,618),"chelsea whole (112x72 in)":(975,1098),"flower whole (160x104 in)":(1488,1612)}
win={"astronaut whole (128x128 in)":(120,0,192,72),"chelsea whole (112x72 in)":(130,10,190,70),"flower whole (160x104 in)":(0,60,64,124)}
cols=[("bicubic",A,1),("served before",A,2),("flat guard 0.01",B,2),("truth",A,3)]
tiles=[]
for name,(y0,y1) in rows.items():
    row=[]; zoom=[]
    for label,src,c in cols:
        t=src.crop((c*W,y0,(c+1)*W,y1)); row.append(t)
        x0,yy0,x1,yy1=win[name]; z=t.crop((x0,yy0,x1,yy1)); z=z.resize((z.size[0]*W//(x1-x0), z.size[1]*W//(x1-x0)), Image.NEAREST); zoom.append(z)
    tiles.append((name,row,zoom))
H=sum(14+r[0].size[1]+z[0].size[1]+4 for _,r,z in tiles)+14
out=Image.new('RGB',(4*W,H),'white'); d=ImageDraw.Draw(out)
d.text((2,1),"mild-64px through cdd-serve, seed 0: "+" | ".join(l for l,_,_ in cols)+"; under each, a flat window enlarged",fill='black')
y=14
for name,row,zoom in tiles:
    d.text((2,y+1),name,fill='black'); y+=14
    for i,t in enumerate(row): out.paste(t,(i*W,y))
    y+=row[0].size[1]
    for i,t in enumerate(zoom): out.paste(t,(i*W,y))
    y+=zoom[0].size[1]+4
out.save("docs/images/sr_guard_photos.jpg", quality=90); print(out.size)

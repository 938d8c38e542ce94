# A pure-Python emulation of the per-layer CUDA engine (src/ops/maml/layered.rs driving the
# maml_gemm_{naive,tiled}, maml_bias_act, ... kernels of kernels/maml.cu), written line for line
# from the Rust orchestration and the kernels: the same operands (offset, task stride, row and
# column strides), the same element-wise kernels, and the tiled product's tile loads (which
# dimension runs fastest) and 4x4 strided micro-tiles. It checks gradients, HVPs and the
# second-order meta-gradient against central finite differences, unwritten buffers being NaN.
#
# It exists because the machine the engine was written on has no GPU: it catches stride and
# orchestration mistakes, not CUDA-specific ones. Run: python3 layered_emulation.py naive|tiled
# (no dependencies; a few seconds).
import math, random
random.seed(1)

def act_value(act, z):
    if act == 0: return max(z, 0.0)
    if act == 1: return math.tanh(z)
    if act == 2: return 0.5*z*(1+math.tanh(0.7978845608028654*(z+0.044715*z**3)))
    return max(z,0.0)+math.log1p(math.exp(-abs(z)))
def act_derivs(act, z):
    if act == 0: return (1.0 if z>0 else 0.0), 0.0
    if act == 1:
        t=math.tanh(z); d1=1-t*t; return d1, -2*t*d1
    if act == 2:
        c,a=0.7978845608028654,0.044715
        t=math.tanh(c*(z+a*z**3)); s2=1-t*t; du=c*(1+3*a*z*z); ddu=6*c*a*z
        return 0.5*(1+t)+0.5*z*s2*du, s2*(du+0.5*z*(ddu-2*t*du*du))
    s=1/(1+math.exp(-z)); return s, s*(1-s)

def at(o, t, i, j): return o['off'] + t*o['batch'] + i*o['rs'] + j*o['cs']
def rows(off,batch,ld): return dict(off=off,batch=batch,rs=ld,cs=1)
def tr(o): return dict(off=o['off'],batch=o['batch'],rs=o['cs'],cs=o['rs'])

TILED = True
def gemm(A, ao, B, bo, C, co, m, n, k, tasks, acc):
    if not TILED:
        for t in range(tasks):
            for i in range(m):
                for j in range(n):
                    s=sum(A[at(ao,t,i,q)]*B[at(bo,t,q,j)] for q in range(k))
                    ci=at(co,t,i,j); C[ci] = C[ci]+s if acc else s
        return
    TM=TN=64; TK=16
    tiles_m=(m+TM-1)//TM; tiles_n=(n+TN-1)//TN
    a_k_fast = ao['cs']==1; b_n_fast = bo['cs']==1
    for t in range(tasks):
        for tm in range(tiles_m):
            for tn in range(tiles_n):
                m0,n0=tm*TM,tn*TN
                accs=[[0.0]*16 for _ in range(256)]
                for k0 in range(0,k,TK):
                    As=[[None]*(TM+1) for _ in range(TK)]; Bs=[[None]*(TN+1) for _ in range(TK)]
                    for e in range(TM*TK):
                        mm = e//TK if a_k_fast else e%TM
                        kk = e%TK if a_k_fast else e//TM
                        gm,gk=m0+mm,k0+kk
                        As[kk][mm] = A[at(ao,t,gm,gk)] if gm<m and gk<k else 0.0
                    for e in range(TK*TN):
                        nn = e%TN if b_n_fast else e//TK
                        kk = e//TN if b_n_fast else e%TK
                        gn,gk=n0+nn,k0+kk
                        Bs[kk][nn] = B[at(bo,t,gk,gn)] if gn<n and gk<k else 0.0
                    for tid in range(256):
                        tx,ty=tid%16,tid//16
                        # compute
                        for i in range(4):
                            for j in range(4):
                                accs[tid][i*4+j] += sum(As[kk][ty+16*i]*Bs[kk][tx+16*j] for kk in range(TK))
                for tid in range(256):
                    tx,ty=tid%16,tid//16
                    for i in range(4):
                        for j in range(4):
                            gm,gn=m0+ty+16*i,n0+tx+16*j
                            if gm<m and gn<n:
                                ci=at(co,t,gm,gn); C[ci] = C[ci]+accs[tid][i*4+j] if acc else accs[tid][i*4+j]

def bias_act(z,h,p,b_off,p_stride,n,fo,z_stride,tasks,act):
    per=n*fo
    for e in range(per*tasks):
        t,r=divmod(e,per); o=r%fo; idx=t*z_stride+r
        v=z[idx]+p[b_off+t*p_stride+o]; z[idx]=v
        if h is not None: h[idx]=act_value(act,v)
def r_bias_act(rz,rh,z,v,b_off,v_stride,n,fo,z_stride,tasks,act):
    per=n*fo
    for e in range(per*tasks):
        t,r=divmod(e,per); o=r%fo; idx=t*z_stride+r
        rv=rz[idx]+v[b_off+t*v_stride+o]; rz[idx]=rv
        if rh is not None: rh[idx]=act_derivs(act,z[idx])[0]*rv
def loss_rows(z,rz,z_stride,y,labels,n,width,tasks,loss,delta,rdelta,d_stride,row_loss,rows_):
    for e in range(n*tasks):
        t,s=divmod(e,n)
        zr=t*z_stride+s*width; dr=t*d_stride+s*width
        c=0.0
        if loss==0:
            cnt=float(n*width)
            for j in range(width):
                err=z[zr+j]-y[e*width+j]; c+=err*err/cnt; delta[dr+j]=2*err/cnt
                if rdelta is not None: rdelta[dr+j]=2*rz[zr+j]/cnt
        else:
            lab=labels[e]; m=max(z[zr:zr+width]); S=sum(math.exp(z[zr+j]-m) for j in range(width))
            prz=sum(math.exp(z[zr+j]-m)/S*rz[zr+j] for j in range(width)) if rdelta is not None else 0
            for j in range(width):
                pr=math.exp(z[zr+j]-m)/S
                delta[dr+j]=(pr-(1.0 if j==lab else 0.0))/n
                if rdelta is not None: rdelta[dr+j]=pr*(rz[zr+j]-prz)/n
            c=(math.log(S)+m-z[zr+lab])/n
        row_loss[t*rows_+s]=c
def task_loss(row_loss,rows_,n,losses,tasks):
    for t in range(tasks): losses[t]=sum(row_loss[t*rows_+s] for s in range(n))
def col_sum(d,d_stride,n,width,out,out_off,out_stride,tasks):
    for e in range(width*tasks):
        t,o=divmod(e,width); out[out_off+t*out_stride+o]=sum(d[t*d_stride+s*width+o] for s in range(n))
def act_back(d,rd,d_stride,z,rz,z_stride,n,width,tasks,act):
    per=n*width
    for e in range(per*tasks):
        t,r=divmod(e,per); di=t*d_stride+r; zi=t*z_stride+r
        d1,d2=act_derivs(act,z[zi]); dh=d[di]; d[di]=dh*d1
        if rd is not None: rd[di]=rd[di]*d1+dh*d2*rz[zi]
NAN=float('nan')
class Engine:
    def __init__(s, sizes, act, loss, tasks, rows_, with_r):
        s.sizes=sizes; s.L=len(sizes)-1; s.act=act; s.loss=loss; s.tasks=tasks; s.rows=rows_
        s.w_off=[]; off=0
        for l in range(s.L): s.w_off.append(off); off+=sizes[l+1]*(sizes[l]+1)
        s.P=off; s.wide=max(sizes[1:])
        E=lambda w:[NAN]*(tasks*rows_*w)
        s.z=[E(sizes[l+1]) for l in range(s.L)]; s.h=[E(sizes[l+1]) for l in range(s.L-1)]
        s.rz=[E(sizes[l+1]) for l in range(s.L)] if with_r else []
        s.rh=[E(sizes[l+1]) for l in range(s.L-1)] if with_r else []
        s.d=E(s.wide); s.d_next=E(s.wide); s.rd=E(s.wide); s.rd_next=E(s.wide); s.row_loss=E(1)
    def fi(s,l): return s.sizes[l]
    def fo(s,l): return s.sizes[l+1]
    def input_op(s,l,xn):
        fi=s.fi(l); return rows(0,xn*fi,fi) if l==0 else rows(0,s.rows*fi,fi)
    def weight_op(s,l,stride): return tr(rows(s.w_off[l],stride,s.fi(l)))
    def forward(s,p,pst,v,vst,x,n):
        for l in range(s.L):
            fi,fo=s.fi(l),s.fo(l); hidden=l+1<s.L
            in_op=s.input_op(l,n); out_op=rows(0,s.rows*fo,fo)
            inp = x if l==0 else s.h[l-1]
            w=s.weight_op(l,pst)
            gemm(inp,in_op,p,w,s.z[l],out_op,n,fo,fi,s.tasks,False)
            b_off=s.w_off[l]+fo*fi
            bias_act(s.z[l], s.h[l] if hidden else None, p,b_off,pst,n,fo,s.rows*fo,s.tasks,s.act)
            if v is None: continue
            vw=s.weight_op(l,vst)
            gemm(inp,in_op,v,vw,s.rz[l],out_op,n,fo,fi,s.tasks,False)
            if l>0: gemm(s.rh[l-1],s.input_op(l,n),p,w,s.rz[l],out_op,n,fo,fi,s.tasks,True)
            r_bias_act(s.rz[l], s.rh[l] if hidden else None, s.z[l], v,b_off,vst,n,fo,s.rows*fo,s.tasks,s.act)
    def head(s,y,labels,n,r,losses):
        last=s.L-1; width=s.sizes[-1]
        loss_rows(s.z[last], s.rz[last] if r else None, s.rows*width, y, labels, n, width, s.tasks, s.loss,
                  s.d, s.rd if r else None, s.rows*s.wide, s.row_loss, s.rows)
        if losses is not None: task_loss(s.row_loss,s.rows,n,losses,s.tasks)
    def backward(s,p,pst,v,vst,hv,x,n,grad):
        d_batch=s.rows*s.wide; P=s.P
        for l in reversed(range(s.L)):
            fi,fo=s.fi(l),s.fo(l)
            in_op=s.input_op(l,n); delta=rows(0,d_batch,fo); dw=rows(s.w_off[l],P,fi); b_off=s.w_off[l]+fo*fi
            inp = x if l==0 else s.h[l-1]
            if grad is not None:
                gemm(s.d,tr(delta),inp,in_op,grad,dw,fo,fi,n,s.tasks,False)
                col_sum(s.d,d_batch,n,fo,grad,b_off,P,s.tasks)
            if v is not None:
                gemm(s.rd,tr(delta),inp,in_op,hv,dw,fo,fi,n,s.tasks,False)
                if l>0: gemm(s.d,tr(delta),s.rh[l-1],in_op,hv,dw,fo,fi,n,s.tasks,True)
                col_sum(s.rd,d_batch,n,fo,hv,b_off,P,s.tasks)
            if l==0: break
            below=rows(0,d_batch,fi); w=rows(s.w_off[l],pst,fi)
            gemm(s.d,delta,p,w,s.d_next,below,n,fi,fo,s.tasks,False)
            if v is not None:
                vw=rows(s.w_off[l],vst,fi)
                gemm(s.rd,delta,p,w,s.rd_next,below,n,fi,fo,s.tasks,False)
                gemm(s.d,delta,v,vw,s.rd_next,below,n,fi,fo,s.tasks,True)
            act_back(s.d_next, s.rd_next if v is not None else None, d_batch, s.z[l-1], s.rz[l-1] if v is not None else None, s.rows*fi, n, fi, s.tasks, s.act)
            s.d,s.d_next=s.d_next,s.d; s.rd,s.rd_next=s.rd_next,s.rd

def loss_grad(sizes,act,loss,tasks,p,pst,x,y,lab,n):
    e=Engine(sizes,act,loss,tasks,n+2,False); P=e.P
    g=[NAN]*(tasks*P); L=[NAN]*tasks
    e.forward(p,pst,None,0,x,n); e.head(y,lab,n,False,L); e.backward(p,pst,None,0,None,x,n,g)
    return L,g
def hvp(sizes,act,loss,tasks,p,pst,v,vst,x,y,lab,n):
    e=Engine(sizes,act,loss,tasks,n+2,True); P=e.P
    hv=[NAN]*(tasks*P)
    e.forward(p,pst,v,vst,x,n); e.head(y,lab,n,True,None); e.backward(p,pst,v,vst,hv,x,n,None)
    return hv

def check(sizes,act,loss,tasks,n,bcast):
    P=sum(sizes[l+1]*(sizes[l]+1) for l in range(len(sizes)-1))
    pst=0 if bcast else P
    p=[random.gauss(0,0.5) for _ in range(P if bcast else tasks*P)]
    v=[random.gauss(0,1) for _ in range(tasks*P)]
    x=[random.gauss(0,1) for _ in range(tasks*n*sizes[0])]
    y=[random.gauss(0,1) for _ in range(tasks*n*sizes[-1])]
    lab=[random.randrange(sizes[-1]) for _ in range(tasks*n)]
    L,g=loss_grad(sizes,act,loss,tasks,p,pst,x,y,lab,n)
    hv=hvp(sizes,act,loss,tasks,p,pst,v,P,x,y,lab,n)
    eps=1e-5; worst_g=worst_h=0
    # gradient: directional derivative per task along v
    for t in range(tasks):
        def shifted(sgn):
            if bcast:  # only check task t: build per-task params
                q=[p[i]+sgn*eps*v[t*P+i] for i in range(P)]
                return q
            q=list(p)
            for i in range(P): q[t*P+i]+=sgn*eps*v[t*P+i]
            return q
        qp,qm=shifted(1),shifted(-1)
        Lp,gp=loss_grad(sizes,act,loss,tasks,qp,pst,x,y,lab,n)
        Lm,gm=loss_grad(sizes,act,loss,tasks,qm,pst,x,y,lab,n)
        dd=(Lp[t]-Lm[t])/(2*eps); gv=sum(g[t*P+i]*v[t*P+i] for i in range(P))
        worst_g=max(worst_g,abs(dd-gv)/max(1e-8,abs(gv)))
        for i in range(P):
            fd=(gp[t*P+i]-gm[t*P+i])/(2*eps)
            worst_h=max(worst_h,abs(fd-hv[t*P+i])/(1e-6+max(abs(x) for x in hv[t*P:(t+1)*P])))
    assert all(math.isfinite(a) for a in g+hv), "NaN (unwritten)"
    print(sizes,act,loss,tasks,n,"bcast" if bcast else "", "TILED" if TILED else "NAIVE", "grad err %.2e hvp err %.2e"%(worst_g,worst_h))
    assert worst_g < 1e-6 and worst_h < 1e-6, "mismatch against finite differences"

import sys
TILED = len(sys.argv) > 1 and sys.argv[1] == "tiled"
check([3,5,4,2],1,0,2,3,False)
check([3,5,4,3],2,1,2,4,True)
check([2,70,3],3,1,2,66,False)
check([4,6,3],0,0,3,5,False)

def meta(sizes,act,loss,tasks,params,xs,ys,ls,ns,xq,yq,lq,nq,steps,lr,second):
    e=Engine(sizes,act,loss,tasks,max(ns,nq),second); P=e.P
    thetas=[[NAN]*(tasks*P) for _ in range(steps)]
    g=[NAN]*(tasks*P); hv=[NAN]*(tasks*P); losses=[NAN]*tasks
    theta0=(params,0)
    for j in range(steps):
        th=theta0 if j==0 else (thetas[j-1],P)
        e.forward(th[0],th[1],None,0,xs,ns); e.head(ys,ls,ns,False,None); e.backward(th[0],th[1],None,0,None,xs,ns,hv)
        # sgd_step
        for ee in range(P*tasks):
            t,i=divmod(ee,P); thetas[j][ee]=th[0][t*th[1]+i]-lr*hv[ee]
    ad=(thetas[-1],P)
    e.forward(ad[0],ad[1],None,0,xq,nq); e.head(yq,lq,nq,False,losses); e.backward(ad[0],ad[1],None,0,None,xq,nq,g)
    if second:
        for j in reversed(range(steps)):
            th=theta0 if j==0 else (thetas[j-1],P)
            e.forward(th[0],th[1],g,P,xs,ns); e.head(ys,ls,ns,True,None); e.backward(th[0],th[1],g,P,hv,xs,ns,None)
            for ee in range(P*tasks): g[ee]-=lr*hv[ee]
    return losses,g

def check_meta(sizes,act,loss,tasks,ns,nq,steps):
    P=sum(sizes[l+1]*(sizes[l]+1) for l in range(len(sizes)-1))
    p=[random.gauss(0,0.5) for _ in range(P)]
    R=lambda k:[random.gauss(0,1) for _ in range(k)]
    xs,xq=R(tasks*ns*sizes[0]),R(tasks*nq*sizes[0]); ys,yq=R(tasks*ns*sizes[-1]),R(tasks*nq*sizes[-1])
    ls=[random.randrange(sizes[-1]) for _ in range(tasks*ns)]; lq=[random.randrange(sizes[-1]) for _ in range(tasks*nq)]
    L,g=meta(sizes,act,loss,tasks,p,xs,ys,ls,ns,xq,yq,lq,nq,steps,0.1,True)
    _,g1=meta(sizes,act,loss,tasks,p,xs,ys,ls,ns,xq,yq,lq,nq,steps,0.1,False)
    eps=1e-5; worst=0; diff_orders=0
    for i in range(P):
        q=list(p); q[i]+=eps; Lp,_=meta(sizes,act,loss,tasks,q,xs,ys,ls,ns,xq,yq,lq,nq,steps,0.1,False)
        q=list(p); q[i]-=eps; Lm,_=meta(sizes,act,loss,tasks,q,xs,ys,ls,ns,xq,yq,lq,nq,steps,0.1,False)
        for t in range(tasks):
            fd=(Lp[t]-Lm[t])/(2*eps); worst=max(worst,abs(fd-g[t*P+i])/(1e-6+max(abs(v) for v in g[t*P:(t+1)*P])))
            diff_orders=max(diff_orders,abs(g[t*P+i]-g1[t*P+i]))
    print("meta",sizes,act,loss,steps,"TILED" if TILED else "NAIVE","fd err %.2e, |second-first| %.2e"%(worst,diff_orders))
    assert worst < 1e-6 and diff_orders > 1e-3, "mismatch against finite differences"

check_meta([2,5,3],1,0,2,3,4,1)
check_meta([2,4,3,3],2,1,2,3,2,3)
